from tests.support.journey_env import env

__all__ = ["env"]
