"""The token role of each prompt position (docs/ARCHITECTURE.md), from the subject's token span.

Model-free, so that code which must not import the model (``circuit_discovery.report``) shares it with the pair
builder (``circuit_discovery.facts.pairs``, which re-exports :func:`token_roles`).
"""
from __future__ import annotations

from circuit_discovery.errors import CircuitDiscoveryError

__all__ = ["TokenRoleError", "token_roles"]


class TokenRoleError(CircuitDiscoveryError, ValueError):
    """A subject span that does not lie inside the prompt's tokens."""


def token_roles(n_tokens: int, span: tuple[int, int], has_bos: bool) -> list[str]:
    """Role of each position (docs/ARCHITECTURE.md): ``bos``, ``subject_first``/``subject_middle``/
    ``subject_last`` (a one-token subject is ``subject_last``), ``relation_first`` (the first token after
    the subject), ``relation`` (other prompt tokens) and ``last`` (the final token, which wins). A span outside
    ``[0, n_tokens)`` or empty raises :class:`TokenRoleError`."""
    s, e = span
    if not 0 <= s < e <= n_tokens:
        raise TokenRoleError(f"subject span {span} out of range for {n_tokens} tokens")
    roles = ["relation"] * n_tokens
    if has_bos:
        roles[0] = "bos"
    for i in range(s, e):
        roles[i] = "subject_middle"
    roles[s] = "subject_first"
    roles[e - 1] = "subject_last"
    if e < n_tokens:
        roles[e] = "relation_first"
    roles[-1] = "last"
    return roles
