"""The one error a job raises when it cannot complete (beside SpecError and PlanError for bad
specs and inputs): the CLI prints its message and exits with status 2."""

from __future__ import annotations


class JobError(RuntimeError):
    """The job could not complete; the message says why and what to do."""
