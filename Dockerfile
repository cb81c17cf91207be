# One image for every recloop process (sim, streams, learn, serve, demo).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements/lock.txt requirements/lock.txt
RUN pip install -r requirements/lock.txt
COPY . .
RUN pip install --no-deps -e .
ENTRYPOINT ["recloop"]
