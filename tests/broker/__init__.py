"""The brokers (broker/): their shared contract, the Redis feed, ACL and Sentinel."""
