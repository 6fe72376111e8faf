"""How a job's messages become one prompt text (the form fingerprints are computed over)."""

from __future__ import annotations

from shared.models import Job


def render_transcript(job: Job) -> str:
    """Chat as a plain transcript, for models without a chat template (base models).

    A turn's prompt ends with ``Assistant:``; the model's answer continues it. The next turn's
    transcript begins with this turn's prompt followed by the answer (as the client sends it
    back, leading whitespace trimmed by the usual clients), so it extends this prompt.
    """
    if job.prompt is not None:
        return job.prompt
    lines = [f"{m.role.capitalize()}: {m.content}" for m in job.messages or []]
    return "\n".join(lines) + "\nAssistant:"


TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")
