"""The worker knows when the next journey timer falls due, so an idle worker wakes then
instead of up to a poll interval later. Both databases."""

from __future__ import annotations

import pytest

from tests.scenarios.test_delivery_batches import WAIT_THEN_MAIL, sign_up
from tests.support.journey_env import JourneyEnv
from whenthen.journeys.tasks import seconds_to_next_timer


def test_seconds_to_the_next_timer_follow_the_waiting_enrollments(env: JourneyEnv) -> None:
    assert seconds_to_next_timer(env.c.db, env.clock) is None
    env.publish(WAIT_THEN_MAIL)
    sign_up(env, 2)
    assert seconds_to_next_timer(env.c.db, env.clock) == pytest.approx(86_400, abs=1)
    env.advance(hours=23)
    assert seconds_to_next_timer(env.c.db, env.clock) == pytest.approx(3_600, abs=1)
    env.advance(hours=2)  # fired: both emails sent, nobody waits
    assert len(env.sink.messages()) == 2
    assert seconds_to_next_timer(env.c.db, env.clock) is None
    # The worker's own wait uses it (the poll interval is far shorter than a day here).
    sign_up_later = [{"type": "track", "userId": "u0", "event": "Signed Up"}]
    env.calls(*sign_up_later)
    assert env.c.worker._idle_wait() == env.c.settings.pipeline.poll_interval_seconds
