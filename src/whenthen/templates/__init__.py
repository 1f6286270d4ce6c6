"""Liquid templates with resource limits."""

from whenthen.templates.rendering import TemplateError, check, render

__all__ = ["TemplateError", "check", "render"]
