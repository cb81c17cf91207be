"""Operating recloop on one machine: the local broker launcher, the demo, its live monitor and
the report. Tooling around the product; the product packages never import it."""
