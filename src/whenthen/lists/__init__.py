"""Static lists of profiles."""

from whenthen.lists.service import (
    add_member,
    all_lists,
    delete_for,
    ensure_list,
    lists_of,
    members,
    move_members,
    remove_member,
)

__all__ = [
    "add_member",
    "all_lists",
    "delete_for",
    "ensure_list",
    "lists_of",
    "members",
    "move_members",
    "remove_member",
]
