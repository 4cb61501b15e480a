"""Deployment (ops/): the cluster, nginx front, Prometheus, deployment files, the lock and packaging."""
