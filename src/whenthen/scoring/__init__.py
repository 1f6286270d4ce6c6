"""Lead scoring with lazy decay, thresholds, and lifecycle stages."""

from whenthen.scoring.model import Crossing, Lifecycle, Score, ScoringModel
from whenthen.scoring.service import (
    Scored,
    delete_model,
    forget,
    funnel,
    lifecycle_of,
    models,
    move_to,
    on_event,
    save_lifecycle,
    save_model,
    scores_of,
    set_stage,
    stage_history_of,
    stage_of,
)

__all__ = [
    "Crossing",
    "Lifecycle",
    "Score",
    "Scored",
    "ScoringModel",
    "delete_model",
    "forget",
    "funnel",
    "lifecycle_of",
    "models",
    "move_to",
    "on_event",
    "save_lifecycle",
    "save_model",
    "scores_of",
    "set_stage",
    "stage_history_of",
    "stage_of",
]
