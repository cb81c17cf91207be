"""The interest_evolution preset reproduces RecSim's published baselines in process.

Published (Ie et al. 2019, interest evolution, 10 candidates, slate 3): a uniform-random
policy averages about 160 watch time per episode and a myopic policy ranking by true click
probability about 166-167. Over 1000 episodes the runs' standard errors are about 0.36
(random) and 0.66 (myopic); the tolerances below are about 5 and 3.5 of them, and the two
policies must also be told apart by their 95% intervals.
"""

from __future__ import annotations

from recloop.producer_sim.policies import MyopicOraclePolicy, RandomPolicy
from recloop.producer_sim.presets import interest_evolution
from recloop.producer_sim.runner import run_episodes

EPISODES = 1000


def test_interest_evolution_reproduces_recsim_baselines() -> None:
    world = interest_evolution(num_candidates=10, slate_size=3)
    rand = run_episodes(world, RandomPolicy(seed=1), EPISODES, seed=2024, users_in_parallel=128)
    myopic = run_episodes(
        world, MyopicOraclePolicy(world), EPISODES, seed=2024, users_in_parallel=128
    )
    print(rand, myopic, sep="\n")
    assert abs(rand.mean_return.mean - 160.0) <= 1.8, rand
    assert abs(myopic.mean_return.mean - 166.5) <= 2.3, myopic
    gap = myopic.mean_return.mean - rand.mean_return.mean
    assert gap > myopic.mean_return.ci95 + rand.mean_return.ci95
    # The myopic policy clicks far more often but on no better items: that is its blind spot.
    assert myopic.ctr.mean > rand.ctr.mean + 0.1
