"""Cluster: connecting to Ray (embedded or a cluster), runtime environments, example
cluster configs (``configs/``) and the local S3 server used by tests."""
