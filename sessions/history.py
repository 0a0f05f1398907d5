"""The chat history as a tree of messages.

Every message has one parent (None for a root) and an ordered list of children: the alternatives
(regenerations, edits) that follow it. `Session.active_leaf` names the last message of the branch the
user sees; `active_path()` walks from it up to the root. Each message remembers in `last_child` which
child was last on the active branch, so switching between alternatives returns to the branch the user
last saw below it. Nothing here deletes a message except `delete_message`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import HistoryError, MessageNotFoundError, SessionFormatError
from .util import clean_name, clean_text, new_id, now

ROLES = ("user", "bot", "system")
MAX_TEXT_CHARS = 2_000_000
MAX_MESSAGES = 100_000


@dataclass
class Message:
    id: str
    parent: str | None
    role: str
    author: str
    text: str
    created: float = 0.0
    tokens: int | None = None
    tokens_per_s: float | None = None
    children: list[str] = field(default_factory=list)
    last_child: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "parent": self.parent, "role": self.role, "author": self.author,
                "text": self.text, "created": self.created, "tokens": self.tokens,
                "tokens_per_s": self.tokens_per_s, "children": list(self.children),
                "last_child": self.last_child}


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise SessionFormatError(f"message text must be a string, not {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise SessionFormatError(f"message text is longer than {MAX_TEXT_CHARS} characters")
    return clean_text(text)


class HistoryMixin:
    """Tree operations; the host class provides `messages: dict[str, Message]` and `active_leaf`."""

    messages: dict[str, Message]
    active_leaf: str | None

    # ---- queries -------------------------------------------------------------------------------

    def message(self, message_id: str) -> Message:
        m = self.messages.get(message_id) if isinstance(message_id, str) else None
        if m is None:
            raise MessageNotFoundError(f"no message {message_id!r:.80} in this session")
        return m

    def roots(self) -> list[str]:
        """Ids of root messages, in insertion order (these are siblings of each other)."""
        return [m.id for m in self.messages.values() if m.parent is None]

    def sibling_ids(self, message_id: str) -> list[str]:
        """Ids of the message's parent's children (the message included), in order."""
        m = self.message(message_id)
        return list(self.messages[m.parent].children) if m.parent is not None else self.roots()

    def siblings(self, message_id: str) -> tuple[int, int]:
        """(index of the message among its alternatives, number of alternatives)."""
        ids = self.sibling_ids(message_id)
        return ids.index(message_id), len(ids)

    def children(self, message_id: str) -> list[Message]:
        return [self.messages[c] for c in self.message(message_id).children]

    def path_to(self, message_id: str | None) -> list[Message]:
        """Messages from the root down to `message_id` (inclusive)."""
        path: list[Message] = []
        mid = message_id
        while mid is not None:
            m = self.message(mid)
            path.append(m)
            mid = m.parent
            if len(path) > len(self.messages):  # only reachable with a corrupted tree
                raise HistoryError("history has a cycle")
        path.reverse()
        return path

    def active_path(self) -> list[Message]:
        """Messages from the root to the active leaf: the conversation as the user sees it."""
        return self.path_to(self.active_leaf)

    def follow(self, message_id: str) -> str:
        """Walk down from `message_id` along `last_child` (the last branch seen) and return the leaf."""
        m = self.message(message_id)
        steps = 0
        while m.last_child is not None:
            m = self.messages[m.last_child]
            steps += 1
            if steps > len(self.messages):
                raise HistoryError("history has a cycle")
        return m.id

    @property
    def message_count(self) -> int:
        return len(self.messages)

    # ---- helpers -------------------------------------------------------------------------------

    def _activate(self, leaf: str | None) -> None:
        """Make `leaf` the active leaf: the branch ends there (its `last_child` is cleared, its
        children stay in the tree) and every ancestor records the branch as its `last_child`."""
        if leaf is None:
            self.active_leaf = None
            return
        m = self.message(leaf)
        m.last_child = None
        while m.parent is not None:
            parent = self.messages[m.parent]
            parent.last_child = m.id
            m = parent
        self.active_leaf = leaf

    # ---- edits ---------------------------------------------------------------------------------

    def add_message(self, parent_id: str | None, role: str, author: str, text: str, *,
                    tokens: int | None = None, tokens_per_s: float | None = None) -> str:
        """Add a message under `parent_id` (None: a new root); it becomes the active leaf."""
        if parent_id is not None:
            self.message(parent_id)
        if role not in ROLES:
            raise HistoryError(f"role must be one of {ROLES}, not {role!r:.40}")
        author = clean_name(author, allow_empty=True)
        text = _check_text(text)
        if len(self.messages) >= MAX_MESSAGES:
            raise HistoryError(f"a session holds at most {MAX_MESSAGES} messages")
        mid = new_id()
        self.messages[mid] = Message(id=mid, parent=parent_id, role=role, author=author, text=text,
                                     created=now(), tokens=tokens, tokens_per_s=tokens_per_s)
        if parent_id is not None:
            self.messages[parent_id].children.append(mid)
        self._activate(mid)
        return mid

    def append(self, role: str, author: str, text: str, **kw) -> str:
        """Add a message after the active leaf."""
        return self.add_message(self.active_leaf, role, author, text, **kw)

    def edit(self, message_id: str, new_text: str) -> str:
        """Create a sibling of `message_id` with `new_text` (same role and author) and make it the active
        leaf. The original and its replies stay in the tree as the other alternative. Returns the new id."""
        m = self.message(message_id)
        return self.add_message(m.parent, m.role, m.author, new_text)

    def regenerate(self, bot_message_id: str) -> str | None:
        """Prepare a new alternative of a bot message: the active leaf moves to its parent, whose id is
        returned; the caller generates and adds the new reply with add_message(parent, "bot", ...)."""
        m = self.message(bot_message_id)
        if m.role != "bot":
            raise HistoryError("only bot messages can be regenerated")
        self._activate(m.parent)
        return m.parent

    def rewind(self, message_id: str | None) -> None:
        """Make `message_id` the active leaf (None: empty conversation). Later messages stay in the tree:
        adding a message now forks, and switch() gets back to the old branch."""
        if message_id is not None:
            self.message(message_id)
        self._activate(message_id)

    def switch(self, message_id: str, direction: int | str = 0, *, index: int | None = None) -> str:
        """Move to another alternative of `message_id`: `index` picks one directly (IndexError-like
        HistoryError when out of range); otherwise `direction` (-1/+1 or "prev"/"next") steps, clamped at
        the ends. The branch then continues down the alternative's last seen path. Returns the new leaf."""
        ids = self.sibling_ids(message_id)
        cur = ids.index(message_id)
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(ids):
                raise HistoryError(f"alternative index {index!r:.40} out of range 0..{len(ids) - 1}")
            target = index
        else:
            if direction in ("prev", "left"):
                direction = -1
            elif direction in ("next", "right"):
                direction = 1
            if isinstance(direction, bool) or not isinstance(direction, int):
                raise HistoryError(f"direction must be an int or 'prev'/'next', not {direction!r:.40}")
            target = min(max(cur + direction, 0), len(ids) - 1)
        leaf = self.follow(ids[target])
        self._activate(leaf)
        return leaf

    def delete_message(self, message_id: str) -> str | None:
        """Remove a message and its whole subtree. If the active branch ran through it, the view moves to
        the neighbouring alternative (previous, else next) or, when there is none, ends at the parent.
        Returns the new active leaf."""
        m = self.message(message_id)
        on_active = any(p.id == message_id for p in self.active_path())
        siblings = self.sibling_ids(message_id)
        i = siblings.index(message_id)
        remaining = siblings[:i] + siblings[i + 1:]
        neighbour = remaining[i - 1] if i > 0 else (remaining[0] if remaining else None)

        stack, doomed = [message_id], []
        while stack:
            mid = stack.pop()
            doomed.append(mid)
            stack.extend(self.messages[mid].children)
        if m.parent is not None:
            parent = self.messages[m.parent]
            parent.children.remove(message_id)
            if parent.last_child == message_id:
                parent.last_child = neighbour
        for mid in doomed:
            del self.messages[mid]

        if on_active:
            if neighbour is not None:
                self._activate(self.follow(neighbour))
            else:
                self._activate(m.parent)
        return self.active_leaf

    def update_message_text(self, message_id: str, text: str, *, tokens: int | None = None,
                            tokens_per_s: float | None = None) -> None:
        """Replace a message's text in place (final streamed text, "continue"). Not an edit: no sibling.
        `tokens`/`tokens_per_s` are updated when given."""
        m = self.message(message_id)
        m.text = _check_text(text)
        if tokens is not None:
            m.tokens = tokens
        if tokens_per_s is not None:
            m.tokens_per_s = tokens_per_s
