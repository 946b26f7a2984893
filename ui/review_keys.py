"""Keyboard shortcuts of the Review app: keys -> clicks on buttons by elem_id, computed from the vocab."""

from __future__ import annotations

import json

ACTION_KEYS = {"Enter": "review-confirm", "x": "review-ood", "b": "review-bad", "s": "review-skip", "u": "review-undo"}
RESERVED = {k for k in ACTION_KEYS if len(k) == 1}


def shortcut_keys(vocab: tuple[str, ...]) -> dict[str, int]:
    """Key -> class index: 1-9 and 0 for the first ten classes, plus each unambiguous first letter."""
    keys = {str((i + 1) % 10): i for i in range(min(10, len(vocab)))}
    firsts: dict[str, list[int]] = {}
    for i, name in enumerate(vocab):
        first = name[:1].lower()
        if first.isascii() and first.isalpha() and first not in RESERVED:
            firsts.setdefault(first, []).append(i)
    keys.update({k: idx[0] for k, idx in firsts.items() if len(idx) == 1})
    return keys


def keyboard_js(vocab: tuple[str, ...]) -> str:
    """Page-load JS: map keys to clicks on buttons by elem_id; never while the user types in a field."""
    keymap = {**ACTION_KEYS, **{k: f"review-class-{i}" for k, i in shortcut_keys(vocab).items()}}
    return _KEYBOARD_JS.replace("__KEYS__", json.dumps(keymap))


_KEYBOARD_JS = """() => {
  if (window.__loupeReviewKeys) return;  // Gradio may run load JS again; one listener is enough
  window.__loupeReviewKeys = true;
  const KEYS = __KEYS__;
  const TYPING = new Set(["text", "search", "email", "number", "password", "url", "tel"]);
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.isComposing) return;
    const t = e.target;
    if (t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
              (t.tagName === "INPUT" && TYPING.has((t.type || "text").toLowerCase())))) return;
    const id = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
    const button = id && document.getElementById(id);
    if (!button || button.disabled) return;
    e.preventDefault();  // also stops Enter from "clicking" whichever button has focus
    button.click();
  });
}"""


def key_hint(i: int, name: str, keys: dict[str, int]) -> str:
    mine = [k.upper() if k.isalpha() else k for k, idx in keys.items() if idx == i]
    return f"{name}  [{' / '.join(mine)}]" if mine else name
