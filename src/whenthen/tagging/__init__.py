"""Tag rules: add or remove a tag when a person does something and a condition holds."""

from whenthen.tagging.model import TagRule, matches
from whenthen.tagging.service import delete_rule, get_rule, on_event, rules, save_rule

__all__ = ["TagRule", "delete_rule", "get_rule", "matches", "on_event", "rules", "save_rule"]
