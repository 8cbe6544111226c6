"""The evaluation fixtures (tests/helpers/tasks.py): tiny random exports and synthetic tasks."""

from tests.helpers.tasks import synthetic_task, tiny_export  # noqa: F401  (fixtures)
