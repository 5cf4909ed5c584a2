"""The parameter server: flat fp32 shards, Adam, and the consistency gate (`shardps-server`)."""
