"""Where things run and live: storage, local Ray and S3 helpers, cluster configs."""
