"""A true reason for a chest film that the gate refuses because it is turned or inverted.

The gate's head knows upright, positive frontal chest films. One stored on its side or upside down (a
cassette read the wrong way round, a portable film saved as the operator held it), or exported as a
negative (MONOCHROME1 written out without its inversion), is refused, but with another class's reason:
"another body part", "lateral view", "not a radiograph". Those reasons are false, and they tell the user
nothing they can fix.

Two independent signals must agree before a refusal says "turned film" or "inverted image":

1. A thumbnail question flags the input as that kind: the polarity check's for a negative, and two more
   linear functions of the same 16x16 thumbnail (``Gate.question_scores``), "updown" for a film upside down
   and "sideways" for one on its side, fitted by ``python -m train.ood`` on training scans (as they are and
   mirrored) against the same scans so turned, their thresholds from the validation scans.
2. The model, run on the view that undoes it (the model input turned back, or inverted), gives a vector that
   every check after the model accepts (``Gate.check_after_model``: a child's frontal chest film), and no
   thumbnail question flags the view itself (a quarter turn the wrong way leaves the film upside down: the head
   sometimes accepts it, the updown question does not; ``train/plans/orient.json`` row 3).

When the gate refuses an input after the model's pass (except as "inverted image", already true), each view
whose question agrees and that no question flags itself goes through the model (one more pass, for refused
inputs only, of at most four images, usually one); an accepted one gives the refusal its reason (the one most
like a chest film, when several are). The refusal stands: a corrected view is not labelled; the user turns or
inverts the file and sends it again. When no view qualifies, nothing changes. The adult check is part of 2 on
purpose: an image that, turned, reads only as an adult's chest film is as likely something else that the head
mistakes for one (a silhouette of a horse, upside down, scored so).

A film upside down is not always refused by the head (its lungs are still two dark fields side by side).
So an accepted input that the upside-down question flags has its half turn run through the model too, and is
refused as upside down only when the gate accepts the half turn and finds it more like a frontal chest film
than the input (a lower head score). On validation, each upright film under an acquisition shift that the
question flagged and whose half turn passed had scored better upright, and each film upside down worse.

``cxr_edge/webapp/cxr.js`` (``reorientReason``, ``upsideDown``) does the same in the browser.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from cxr_edge.ood import REASONS, Gate

# (quarter turns counterclockwise that bring the film upright, or None for the inversion; what the file is;
# the thumbnail question that must flag it)
VIEWS = ((1, "a frontal chest X-ray turned 90 degrees clockwise; rotate it upright", "sideways"),
         (2, "a frontal chest X-ray upside down; rotate it upright", "updown"),
         (3, "a frontal chest X-ray turned 90 degrees counterclockwise; rotate it upright", "sideways"),
         (None, "a negative: bones dark, air bright; inverted, it reads as a frontal chest X-ray", "polarity"))
UPSIDE_DOWN = 1  # the index in VIEWS of the half turn


def worth_asking(reason: str) -> bool:
    """True for a refusal after the model's pass by the gate's head, its density or adult checks, whose reason
    may be false for a turned film (an adult check reading a chest film on its side scored it far above any
    adult's); False for the polarity check's, whose reason ("inverted image") is already the true one."""
    return not reason.startswith(REASONS["inverted"])


def view(gray: np.ndarray, k: Optional[int]) -> np.ndarray:
    """The model input ``uint8[S, S]`` turned ``k`` quarter turns counterclockwise (``np.rot90``), or inverted
    (``k`` None)."""
    g = np.asarray(gray, np.uint8)
    return np.rot90(g, k) if k is not None else 255 - g


def candidates(gate: Gate, gray: np.ndarray) -> list:
    """``(i, view)`` for each ``VIEWS[i]`` whose thumbnail question flags the refused input ``gray`` and whose
    view no question flags (a quarter turn the wrong way leaves the film upside down, and the updown question
    sees it): the views worth a model pass."""
    flagged = gate.flags(gray)
    views = [(i, view(gray, k)) for i, (k, _, key) in enumerate(VIEWS) if key in flagged]
    return [(i, g) for i, g in views if not gate.flags(g)]


def reason(gate: Gate, picks: list, view_grays: list, embeddings) -> Optional[str]:
    """The true reason from the views ``VIEWS[i]`` for ``i`` in ``picks`` (their model inputs and gate
    vectors): the accepted one the head finds most like a frontal chest film, else None."""
    best = None
    for i, g, e in zip(picks, view_grays, embeddings):
        v = gate.check_after_model(e, g)
        if v.ok and (best is None or v.score < best[0]):
            best = (v.score, i)
    if best is None:
        return None
    k, what, _ = VIEWS[best[1]]
    return f"{REASONS['turned'] if k is not None else REASONS['inverted']} ({what})"


def explain(gate: Gate, refused: list, accepted: list, accepted_scores: list,
            embed: Callable[[np.ndarray], np.ndarray]) -> tuple:
    """(a true reason or None for each refused model input of ``refused``; the upside-down reason or None for
    each of ``accepted``, whose head scores are ``accepted_scores``), all inputs ``uint8[S, S]``; one call of
    ``embed`` (``uint8[N, S, S]`` -> gate vectors ``[N, D]``) for every view asked about, none when none is."""
    picks = [candidates(gate, g) for g in refused]
    flagged = [i for i, g in enumerate(accepted) if "updown" in gate.flags(g)]
    grays = [g for p in picks for _, g in p]
    grays += [view(accepted[i], VIEWS[UPSIDE_DOWN][0]) for i in flagged]
    if not grays:
        return [None] * len(refused), [None] * len(accepted)
    emb = embed(np.stack(grays))
    why, at = [], 0
    for p in picks:
        why.append(reason(gate, [i for i, _ in p], grays[at:at + len(p)], emb[at:at + len(p)]))
        at += len(p)
    turned = [None] * len(accepted)
    for j, i in enumerate(flagged):
        v = gate.check_after_model(emb[at + j], grays[at + j])
        if v.ok and v.score < accepted_scores[i]:
            turned[i] = f"{REASONS['turned']} ({VIEWS[UPSIDE_DOWN][1]})"
    return why, turned
