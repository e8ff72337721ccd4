"""Local services for development, tests and the demo, never used by a run itself: a Ray head on 127.0.0.1
(`python -m cluster.local up|down|status|env`, head.py), an authenticated S3 server (s3_server.py), and the
fake multi-node autoscaling config (autoscaling/)."""
