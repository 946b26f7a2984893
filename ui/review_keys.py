"""Keyboard shortcuts of the Review app: action keys click buttons by elem_id; class keys come with each item's
vocab (a hidden keymap element), since items of several model versions may be reviewed in one session."""

from __future__ import annotations

import html
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


def keymap_html(vocab: tuple[str, ...]) -> str:
    """A hidden element carrying this item's key -> class map; the keyboard script reads it on every key press."""
    keymap = {k: vocab[i] for k, i in shortcut_keys(tuple(vocab)).items()}
    return f'<div id="review-keymap" hidden data-keys="{html.escape(json.dumps(keymap), quote=True)}"></div>'


def keyboard_js() -> str:
    """Page-load JS: action keys click their buttons; class keys relabel through the hidden key target."""
    return _KEYBOARD_JS.replace("__ACTIONS__", json.dumps(ACTION_KEYS))


_KEYBOARD_JS = """() => {
  if (window.__loupeReviewKeys) return;  // Gradio may run load JS again; one listener is enough
  window.__loupeReviewKeys = true;
  const ACTIONS = __ACTIONS__;
  const TYPING = new Set(["text", "search", "email", "number", "password", "url", "tel"]);
  const classOf = (key) => {
    const map = document.getElementById("review-keymap");
    try { return map ? JSON.parse(map.dataset.keys || "{}")[key] : undefined; } catch (err) { return undefined; }
  };
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.isComposing) return;
    const t = e.target;
    if (t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
              (t.tagName === "INPUT" && TYPING.has((t.type || "text").toLowerCase())))) return;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    let button = ACTIONS[key] && document.getElementById(ACTIONS[key]);
    const label = button ? undefined : classOf(key);
    if (label !== undefined) {
      const box = document.querySelector("#review-key-label textarea, #review-key-label input");
      button = document.getElementById("review-key-relabel");
      if (!box || !button) return;
      box.value = label;
      box.dispatchEvent(new Event("input", { bubbles: true }));
    }
    if (!button || button.disabled) return;
    e.preventDefault();  // also stops Enter from "clicking" whichever button has focus
    button.click();
  });
}"""


def key_hint(i: int, name: str, keys: dict[str, int]) -> str:
    mine = [k.upper() if k.isalpha() else k for k, idx in keys.items() if idx == i]
    return f"{name}  [{' / '.join(mine)}]" if mine else name
