"""The Mercure hub (api/mercure): matchers, authorization, the space, the endpoint, its browser and resilience."""
