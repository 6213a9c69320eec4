"""What several test files share: run configs, loopback servers, a Ray cluster with S3, engine helpers,
reader/writer row builders and hand-edited outputs for validate."""
