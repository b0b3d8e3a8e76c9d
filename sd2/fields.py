"""Field specs: which part of a dataset row is the prompt, the response or the text.

A spec is a column name followed by steps into the value, applied left to right:

    prompt                            the column `prompt`
    prompt[0]                         item 0 of a list column (MT-Bench: the first turn); [-1] is the last
    messages[1].content               key `content` of item 1
    messages[role=assistant].content  key `content` of the first item whose `role` is `assistant`

A missing column, a key missing from a dict, or a step that does not fit the value's type
(indexing a string, a key of a list) is an error in the spec and stops the run. An index past
the end of a list, or no item matching [key=value], leaves the field empty in that row: the row
is dropped and counted, since conversations legitimately differ in length.
"""

import re
from dataclasses import dataclass

_COLUMN = re.compile(r"[^.\[\]=]+")
_STEP = re.compile(r"\.(?P<key>[^.\[\]=]+)|\[(?P<index>-?\d+)\]|\[(?P<mkey>[^.\[\]=]+)=(?P<mval>[^\[\]]*)\]")


class FieldSpecError(ValueError):
    """A field spec is malformed, or does not fit the data it is applied to."""


@dataclass(frozen=True)
class FieldSpec:
    text: str
    column: str
    steps: tuple  # ("key", name) | ("index", i) | ("match", key, value)

    def resolve(self, row: dict):
        """The text this spec names in `row`; None where the row has no such item (see module doc)."""
        value = row[self.column]
        where = self.column
        for step in self.steps:
            if value is None:
                return None
            if step[0] == "key":
                if not isinstance(value, dict):
                    raise FieldSpecError(
                        f"{where} is a {type(value).__name__}, not a dict, so it has no key '{step[1]}'"
                    )
                if step[1] not in value:
                    raise FieldSpecError(f"{where} has no key '{step[1]}'; its keys are {sorted(value)}")
                value = value[step[1]]
                where += f".{step[1]}"
                continue
            if not isinstance(value, list):
                raise FieldSpecError(f"{where} is a {type(value).__name__}, not a list, so it cannot be indexed")
            if step[0] == "index":
                if not -len(value) <= step[1] < len(value):
                    return None
                value = value[step[1]]
                where += f"[{step[1]}]"
            else:
                _, key, wanted = step
                bad = [item for item in value if not isinstance(item, dict)]
                if bad:
                    raise FieldSpecError(f"{where} holds {type(bad[0]).__name__} items, not dicts with a key '{key}'")
                value = next((item for item in value if str(item.get(key)) == wanted), None)
                where += f"[{key}={wanted}]"
        if value is not None and not isinstance(value, str):
            hint = f"; pick one item, e.g. '{self.text}[0]'" if isinstance(value, list) else ""
            raise FieldSpecError(f"{where} is a {type(value).__name__}, not text{hint}")
        return value


def parse(spec: str) -> FieldSpec:
    """Parse a field spec once; raises FieldSpecError naming the spec and the offending part."""
    head = _COLUMN.match(spec or "")
    if not head:
        raise FieldSpecError(f"field spec {spec!r} does not start with a column name")
    steps, pos = [], head.end()
    while pos < len(spec):
        m = _STEP.match(spec, pos)
        if not m:
            raise FieldSpecError(
                f"field spec {spec!r}: cannot read {spec[pos:]!r} (steps are [index], [key=value] and .key)"
            )
        if m["key"] is not None:
            steps.append(("key", m["key"]))
        elif m["index"] is not None:
            steps.append(("index", int(m["index"])))
        else:
            steps.append(("match", m["mkey"], m["mval"]))
        pos = m.end()
    return FieldSpec(spec, head.group(), tuple(steps))
