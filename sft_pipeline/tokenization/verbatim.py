"""The proof, from a template's Jinja syntax tree, that it copies message contents verbatim."""

from __future__ import annotations

from typing import Any

# What a template may read from a message: its fields, nothing else (no `.items()`, `.get`, ...).
_MESSAGE_KEYS = ("role", "content")
# Attributes of Jinja's loop object that depend on the position only.
_LOOP_ATTRIBUTES = ("index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0")


def template_writes_content_verbatim(template_text: str) -> bool:
    """True when the template's output can depend on a message's content only by writing it verbatim.

    Proved from the template's syntax tree (parsed by transformers' own Jinja environment): every
    read of a message's content goes straight to the output, alone or joined with `+` / `~`, in a
    loop, an `if` or a `{% generation %}` block; messages and the message list are used only for
    their roles, their length, indexing, slicing and truthiness. Then the rendered text of any
    conversation is the skeleton of its role sequence with the contents pasted in, and rows need
    no second render to be verified. Conservative: anything else (a filter, test, condition,
    `set`, macro or block that sees a content, a message passed whole anywhere) gives False, and
    every row is then verified by rendering it.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template_text).environment
        tree = environment.parse(template_text)
    except Exception:  # private API moved, or the template does not parse: verify by rendering
        return False
    if environment.autoescape:
        return False
    return _VerbatimProof(tree).holds()


class _VerbatimProof:
    """The syntax-tree walk behind template_writes_content_verbatim."""

    def __init__(self, tree):
        from jinja2 import nodes

        self.nodes = nodes
        self.tree = tree
        self.parent: dict[int, tuple[Any, str]] = {}  # id(node) -> (parent node, field name)
        self.all: list[Any] = []
        stack = [tree]
        while stack:
            node = stack.pop()
            self.all.append(node)
            for name, value in node.iter_fields():
                for child in (value if isinstance(value, list) else [value]):
                    if isinstance(child, nodes.Node):
                        self.parent[id(child)] = (node, name)
                        stack.append(child)
        self.list_names = {"messages"}
        self.message_names: set[str] = set()

    def kind(self, node) -> str | None:
        """'list' (of messages), 'message', or None (anything else) for an expression."""
        n = self.nodes
        if isinstance(node, n.Name) and node.ctx == "load":
            if node.name in self.list_names:
                return "list"
            if node.name in self.message_names:
                return "message"
        elif isinstance(node, n.Getitem) and self.kind(node.node) == "list":
            return "list" if isinstance(node.arg, n.Slice) else "message"
        elif isinstance(node, n.Filter) and node.node is not None and self.kind(node.node) == "list":
            return "message" if node.name in ("first", "last") else None
        elif isinstance(node, n.Getattr) and isinstance(node.node, n.Name) and node.node.name == "loop" \
                and node.attr in ("previtem", "nextitem"):
            return "message"
        return None

    def bindings(self) -> dict[str, list[Any]]:
        """Every place a name is bound: ("for", iterable) or ("set", value) when it is one plain name,
        None when the value cannot be classified (unpacking, {% set %} blocks, with, macro arguments)."""
        n = self.nodes
        out: dict[str, list[Any]] = {}

        def add(target, source) -> None:
            plain = isinstance(target, n.Name)
            for name in ([target] if plain else list(target.find_all(n.Name))):
                out.setdefault(name.name, []).append(source if plain else None)

        for node in self.all:
            if isinstance(node, n.For):
                add(node.target, ("for", node.iter))
            elif isinstance(node, n.Assign):
                add(node.target, ("set", node.node))
            elif isinstance(node, n.AssignBlock):
                add(node.target, None)
            elif isinstance(node, n.With):
                for target in node.targets:
                    add(target, None)
            elif isinstance(node, (n.Macro, n.CallBlock)):
                for arg in node.args:
                    add(arg, None)
                if isinstance(node, n.Macro):
                    out.setdefault(node.name, []).append(None)
        return out

    def bound_kind(self, source) -> str | None:
        if source is None:
            return None
        how, value = source
        if how == "for":
            return "message" if self.kind(value) == "list" else None
        return self.kind(value)

    def holds(self) -> bool:
        n = self.nodes
        if any(isinstance(x, (n.Include, n.Import, n.FromImport, n.Extends)) or
               (isinstance(x, n.For) and x.recursive) for x in self.all):
            return False
        bindings = self.bindings()
        if "loop" in bindings:
            return False  # `loop` must stay Jinja's loop object (see loop_use_is_allowed)
        # Names bound to messages (loop targets, `set` aliases), to a fixed point.
        changed = True
        while changed:
            changed = False
            for name, sources in bindings.items():
                for source in sources:
                    bound = self.bound_kind(source)
                    names = self.list_names if bound == "list" else self.message_names if bound else None
                    if names is not None and name not in names:
                        names.add(name)
                        changed = True
        # A tracked name must hold that kind wherever it is bound: `set x = messages` then
        # `set x = x[0]` would make x['content'] look like a message field.
        if self.list_names & self.message_names:
            return False
        for name in self.list_names | self.message_names:
            want = "list" if name in self.list_names else "message"
            if any(self.bound_kind(source) != want for source in bindings.get(name, [])):
                return False
        loops = [x for x in self.all if isinstance(x, n.Name) and x.name == "loop"]
        if not all(self.loop_use_is_allowed(x) for x in loops):
            return False
        return all(self.use_is_allowed(node) for node in self.all if self.kind(node) is not None)

    def loop_use_is_allowed(self, node) -> bool:
        """`loop` only as loop.index, loop.first, ... (structure) or loop.previtem / loop.nextitem
        (checked as messages); passing the loop object on or indexing it lets contents out unchecked."""
        parent, field_name = self.parent.get(id(node), (None, ""))
        return isinstance(parent, self.nodes.Getattr) and field_name == "node" and \
            parent.attr in _LOOP_ATTRIBUTES + ("previtem", "nextitem")

    def use_is_allowed(self, node) -> bool:
        n = self.nodes
        parent, field_name = self.parent.get(id(node), (None, ""))
        if self.in_boolean_context(node):
            return True
        if isinstance(parent, n.Assign) and field_name == "node":
            return isinstance(parent.target, n.Name)  # followed as an alias; `ns.x = message` is not
        if self.kind(node) == "list":
            if isinstance(parent, n.For) and field_name == "iter":
                return True
            if isinstance(parent, n.Getitem) and field_name == "node":
                return True
            return isinstance(parent, n.Filter) and field_name == "node" and \
                parent.name in ("length", "count", "first", "last")
        # A message: only its fields may be read, by constant name.
        if isinstance(parent, n.Getitem) and field_name == "node" and isinstance(parent.arg, n.Const):
            key = parent.arg.value
        elif isinstance(parent, n.Getattr) and field_name == "node":
            key = parent.attr
        else:
            return False
        if key not in _MESSAGE_KEYS:
            return False
        return key != "content" or self.written_verbatim(parent)

    def in_boolean_context(self, node) -> bool:
        """The node's value is only ever tested for truth (if/elif, a loop filter, `x if node else y`)."""
        n = self.nodes
        while True:
            parent, field_name = self.parent.get(id(node), (None, ""))
            if isinstance(parent, (n.If, n.CondExpr, n.For)) and field_name == "test":
                return True
            if isinstance(parent, n.Not):
                return True  # `not x` is a bool whatever x is
            if not isinstance(parent, (n.And, n.Or)):
                return False
            node = parent  # `a and b` is a or b itself: it must land in a test too

    def written_verbatim(self, content) -> bool:
        """The content expression is written to the output, at most joined to other strings by + or ~,
        outside any block that could capture or transform the output."""
        n = self.nodes
        node = content
        while True:
            parent, field_name = self.parent.get(id(node), (None, ""))
            if isinstance(parent, (n.Add, n.Concat)):
                node = parent
                continue
            if not (isinstance(parent, n.Output) and field_name == "nodes"):
                return False
            break
        node = parent
        while True:
            parent, field_name = self.parent.get(id(node), (None, ""))
            if parent is None:
                return node is self.tree
            if isinstance(parent, n.For) and field_name in ("body", "else_"):
                pass
            elif isinstance(parent, n.If) and field_name in ("body", "elif_", "else_"):
                pass
            elif isinstance(parent, n.CallBlock) and field_name == "body" and self.is_generation_block(parent):
                pass
            elif not isinstance(parent, n.Template):
                return False
            node = parent

    def is_generation_block(self, block) -> bool:
        """transformers' `{% generation %}` marker: it writes its body unchanged."""
        n = self.nodes
        call = block.call
        return isinstance(call, n.Call) and isinstance(call.node, n.ExtensionAttribute) \
            and call.node.name == "_generation_support" and not call.args and not call.kwargs
