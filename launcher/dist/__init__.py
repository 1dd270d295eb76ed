"""Distributed launch: strategies, planning (pure), cluster environment, estimates."""
