"""Keyboard shortcuts of the Review app, computed per item from the classes of the model that queued it.

Which key does what, in order of precedence:

1. A class whose name is a single character is selected by typing that character: on the digits model **7**
   records "7" (never the 7th class), and a class named "A" is **Shift+A**.
2. Action keys (Enter, Shift+Enter, X, B, S, U) come next. An action whose letter is a class's own name moves to
   Shift+letter; when that is a class too, the action has no key on that item (its button still works).
3. Digits by position (1 = first class ... 0 = tenth) only when no class is named with a digit: a digit key never
   means a class other than the digit it shows.
4. A first letter, when exactly one class starts with it and the letter (in either case) is free.

The item's hidden keymap element (``keymap_html``) carries the result; the page's keyboard script reads it on every
key press, so items of several model versions can be reviewed in one session. The hints (button labels, the keys
line, the relabel choices) are drawn from the same keymap, so they say exactly what each key does.
"""

from __future__ import annotations

import html
import json
from typing import NamedTuple


class Action(NamedTuple):
    name: str  # the action handed to the review handlers
    elem_id: str  # the button the key clicks
    wording: str  # what the button says (without the key)
    keys: tuple[str, ...]  # candidate keys, first free one wins ("Shift+Enter": Enter with Shift held)


CONFIRM = Action("confirm", "review-confirm", "The model is right", ("Enter",))
# Only offered when a user or the dataset claimed a label other than the prediction; recorded as a relabel to it.
CLAIM = Action("claim", "review-claim", "The user is right", ("Shift+Enter",))
OUT_OF_DOMAIN = Action("out_of_domain", "review-ood", "None of these / out of domain", ("x", "X"))
BAD_IMAGE = Action("bad_image", "review-bad", "Bad image", ("b", "B"))
SKIP = Action("skip", "review-skip", "Skip", ("s", "S"))
UNDO = Action("undo", "review-undo", "Undo", ("u", "U"))
ACTIONS = (CONFIRM, CLAIM, OUT_OF_DOMAIN, BAD_IMAGE, SKIP, UNDO)
DIGITS = "1234567890"  # in position order: the first class is 1, the tenth is 0


def _natural(vocab: tuple[str, ...]) -> dict[str, int]:
    return {name: i for i, name in enumerate(vocab) if len(name) == 1 and name.isprintable() and not name.isspace()}


def action_keys(vocab: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Action name -> its key on an item of this vocab (None: the class names took every candidate)."""
    natural = _natural(vocab)
    return {a.name: next((k for k in a.keys if k not in natural), None) for a in ACTIONS}


def shortcut_keys(vocab: tuple[str, ...]) -> dict[str, int]:
    """Key -> class index, by the precedence in the module docstring."""
    keys = _natural(vocab)
    taken = set(keys) | {k for k in action_keys(vocab).values() if k}
    if not any(k.isdigit() for k in keys):
        keys.update({DIGITS[i]: i for i in range(min(10, len(vocab))) if vocab[i] not in keys})
    firsts: dict[str, list[int]] = {}
    for i, name in enumerate(vocab):
        first = name[:1]
        if len(name) > 1 and first.isascii() and first.isalpha():
            firsts.setdefault(first.lower(), []).append(i)
    for letter, idx in firsts.items():
        # Both cases must be free: with Caps Lock on, the script falls back to the other case.
        if len(idx) == 1 and not {letter, letter.upper()} & taken:
            keys[letter] = idx[0]
    return keys


def key_label(key: str) -> str:
    """How a key is written in hints: letter keys as on the keycap, an upper-case letter as Shift+letter."""
    if len(key) == 1 and key.isalpha() and key.isascii():
        return key.upper() if key.islower() else f"Shift+{key}"
    return key


def keymap(vocab: tuple[str, ...], *, claim: bool = False) -> dict[str, list[str]]:
    """Key -> ["action", button elem_id] or ["class", class name], for one item (``vocab`` empty: no item)."""
    out = {k: ["class", vocab[i]] for k, i in shortcut_keys(tuple(vocab)).items()}
    for action in ACTIONS:
        key = action_keys(tuple(vocab))[action.name]
        if key and (action is not CLAIM or claim):
            out[key] = ["action", action.elem_id]
    return out


def keymap_html(vocab: tuple[str, ...], *, claim: bool = False) -> str:
    """A hidden element carrying this item's keymap; the keyboard script reads it on every key press."""
    data = html.escape(json.dumps(keymap(tuple(vocab), claim=claim)), quote=True)
    return f'<div id="review-keymap" hidden data-keys="{data}"></div>'


def class_hint(i: int, name: str, keys: dict[str, int]) -> str:
    """A relabel choice's label: the class and the keys that select it."""
    mine = [key_label(k) for k, idx in keys.items() if idx == i]
    return f"{name}  [{' / '.join(mine)}]" if mine else name


def button_label(action: Action, vocab: tuple[str, ...], detail: str = "", wording: str | None = None) -> str:
    """A button's text on an item of this vocab: its wording, what it records, its key."""
    key = action_keys(tuple(vocab))[action.name]
    return (wording or action.wording) + (f": {detail}" if detail else "") + (f" [{key_label(key)}]" if key else "")


def keys_line(vocab: tuple[str, ...], *, claims: tuple[str, ...] = (), claim_wording: str = CLAIM.wording) -> str:
    """The keys line under the buttons, for the item on screen (HTML; class names escaped)."""
    def kbd(key: str) -> str:
        return f"<kbd>{html.escape(key_label(key))}</kbd>"

    acts = action_keys(tuple(vocab))
    parts = []
    for action in ACTIONS:
        key = acts[action.name]
        if action is CLAIM and len(claims) != 1:
            continue
        if key:
            wording = claim_wording if action is CLAIM else action.wording
            parts.append(f"{kbd(key)} {html.escape(wording[:1].lower() + wording[1:])}")
    keys = shortcut_keys(tuple(vocab))
    by_class: dict[int, list[str]] = {}
    for k, i in keys.items():
        by_class.setdefault(i, []).append(k)
    classes = " · ".join("/".join(kbd(k) for k in by_class[i]) + ("" if by_class[i] == [vocab[i]] else
                                                                  f" {html.escape(vocab[i])}")
                         for i in sorted(by_class))
    line = "Keys: " + " · ".join(parts)
    if classes:
        line += f"<br>Relabel at once: {classes}"
    if len(claims) > 1:
        line += ("<br>Users gave different labels (" + ", ".join(html.escape(c) for c in claims) +
                 "): press the key of the one that is right.")
    return f'<div id="review-keys-line">{line}</div>'


def keyboard_js() -> str:
    """Page-load JS: a key clicks the button its item's keymap names, or relabels through the hidden key target."""
    return _KEYBOARD_JS


_KEYBOARD_JS = """() => {
  if (window.__loupeReviewKeys) return;  // Gradio may run load JS again; one listener is enough
  window.__loupeReviewKeys = true;
  const TYPING = new Set(["text", "search", "email", "number", "password", "url", "tel"]);
  const keymap = () => {
    const map = document.getElementById("review-keymap");
    try { return map ? JSON.parse(map.dataset.keys || "{}") : {}; } catch (err) { return {}; }
  };
  const swapCase = (k) => k === k.toLowerCase() ? k.toUpperCase() : k.toLowerCase();
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.isComposing) return;
    // Only while the Review tab is on screen: a key pressed on another tab (Models, Monitor) decides nothing.
    const shown = document.getElementById("review-image");
    if (!shown || shown.offsetParent === null) return;
    const t = e.target;
    if (t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
              (t.tagName === "INPUT" && TYPING.has((t.type || "text").toLowerCase())))) return;
    // Printable keys arrive as the character typed (Shift already applied); named keys get an explicit Shift+.
    const name = e.key.length === 1 ? e.key : (e.shiftKey ? "Shift+" + e.key : e.key);
    const map = keymap();
    // Caps Lock: a letter nobody claimed in this case means the same as in the other case.
    const entry = map[name] || (e.key.length === 1 ? map[swapCase(name)] : undefined);
    if (!entry) return;
    let button;
    if (entry[0] === "class") {
      const box = document.querySelector("#review-key-label textarea, #review-key-label input");
      button = document.getElementById("review-key-relabel");
      if (!box || !button) return;
      box.value = entry[1];
      box.dispatchEvent(new Event("input", { bubbles: true }));
    } else {
      button = document.getElementById(entry[1]);
    }
    if (!button || button.disabled) return;
    e.preventDefault();  // also stops Enter from "clicking" whichever button has focus
    button.click();
  });
}"""
