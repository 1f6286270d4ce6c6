from tests.support.journey_env import env, pg_env

__all__ = ["env", "pg_env"]
