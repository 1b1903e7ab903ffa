"""metadata.managedFields is cut out of a list page's text before it is decoded
(kubernetes._cut_managed_fields, in _list_items): what is decoded is json.loads' result less
each item's metadata.managedFields, or, where the cut is in doubt, json.loads' result
itself. Never anything else, whatever the strings in the page hold."""
import json

from fuzzing import FUZZ
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.sources import kubernetes

# What could end a managedFields array early, or hide a quote from a naive count.
HOSTILE = ["]", "],", '],"', '}],"', "}]", "}}", '"', '\\"', '\\\\"', "\\", "\\\\", "[",
           "[]", "{", "}", ",", ":", '"managedFields":[', '", "managedFields": [', "\u00e9",
           "\u2028", "\U0001f600", "\x00", "\n", 'k:{"port":80,"protocol":"TCP"}',
           "7318046529183746509"]
text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12),
                 st.lists(st.sampled_from(HOSTILE), max_size=4).map("".join))
fields_v1 = st.recursive(st.just({}), lambda inner: st.dictionaries(text, inner, max_size=3),
                         max_leaves=8)
managed_entry = st.fixed_dictionaries(
    {"manager": text, "operation": st.sampled_from(["Update", "Apply"]),
     "apiVersion": st.just("v1"), "time": st.just("2025-01-01T00:00:00Z"),
     "fieldsType": st.just("FieldsV1"), "fieldsV1": fields_v1})


@st.composite
def list_item(draw, hostile_places=True):
    meta = {"name": draw(text), "namespace": draw(text),
            "labels": draw(st.dictionaries(text, text, max_size=3)),
            "annotations": draw(st.dictionaries(text, text, max_size=2))}
    where = draw(st.sampled_from(["last", "before-version", "first"]))
    managed = draw(st.lists(managed_entry, max_size=3))
    if where == "first":
        meta = {"managedFields": managed, **meta}
    else:
        meta["managedFields"] = managed
    if where != "before-version":  # the fake API server adds resourceVersion after it
        meta["resourceVersion"] = str(draw(st.integers(1, 10**6)))
    else:
        meta["resourceVersion"] = str(draw(st.integers(1, 10**6)))
        meta = {k: meta[k] for k in meta if k != "managedFields"} | {"managedFields": managed}
        meta["resourceVersion"] = meta.pop("resourceVersion")
    obj = {"metadata": meta, "spec": {"ports": [{"name": draw(text), "port": 80}]}}
    if hostile_places:
        place = draw(st.sampled_from(["none", "label", "spec", "escaped-key", "string-value",
                                      "null"]))
        if place == "label":  # no valid API server sends it: a label that is not a string
            meta["labels"]["managedFields"] = managed
        elif place == "spec":
            obj["spec"]["managedFields"] = managed
        elif place == "escaped-key":  # a key whose text ends in "managedFields"
            obj["spec"]['a"managedFields'] = managed
        elif place == "string-value":
            meta["annotations"]["x"] = "managedFields"
            obj["spec"]["y"] = "managedFields"
        elif place == "null":
            meta["managedFields"] = None
    return obj


def page_text(items, draw_separators, ensure_ascii):
    separators = (",", ":") if draw_separators else (", ", ": ")
    return json.dumps({"kind": "List", "metadata": {"resourceVersion": "9", "continue": "c"},
                       "items": items}, separators=separators, ensure_ascii=ensure_ascii)


def without_managed_fields(obj):
    cut = json.loads(json.dumps(obj))
    cut["metadata"].pop("managedFields", None)
    return cut


@settings(FUZZ, max_examples=400)
@given(st.lists(list_item(), max_size=4), st.booleans(), st.booleans())
def test_what_is_decoded_is_the_full_parse_less_managed_fields_or_the_full_parse(
        items, compact, ensure_ascii):
    body = page_text(items, compact, ensure_ascii)
    full = json.loads(body)
    fields = {}
    decoded = list(kubernetes._list_items(body, fields))
    assert len(decoded) == len(full["items"])
    for got, expected in zip(decoded, full["items"]):
        assert got in (expected, without_managed_fields(expected))
    assert fields == {k: v for k, v in full.items() if k != "items"}


@settings(FUZZ, max_examples=300)
@given(st.lists(list_item(hostile_places=False), min_size=1, max_size=4), st.booleans(),
       st.booleans())
def test_an_items_managed_fields_are_cut_whatever_its_strings_hold(items, compact, ensure_ascii):
    """Without a managedFields anywhere but in metadata (as the API server sends them), every
    item's is cut: the property above is not met by never cutting."""
    body = page_text(items, compact, ensure_ascii)
    if kubernetes._CUT_MARK in body:
        return  # such a page is not cut (it is decoded in full)
    decoded = list(kubernetes._list_items(body, {}))
    assert decoded == [without_managed_fields(item) for item in json.loads(body)["items"]]


def test_the_bench_objects_are_cut_as_the_api_server_and_the_fake_write_them():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from k8s_source import service_object, slice_object
    items = [service_object(1), slice_object(2)]
    for separators in ((",", ":"), (", ", ": ")):
        body = json.dumps({"metadata": {}, "items": items}, separators=separators)
        cut, cuts = kubernetes._cut_managed_fields(body)
        assert len(cuts) == 2 and len(cut) < len(body) * 0.8
        assert list(kubernetes._list_items(body, {})) == [
            without_managed_fields(item) for item in items]


def test_a_managed_fields_cut_outside_metadata_is_decoded_from_the_page_as_it_came():
    item = {"metadata": {"name": "a", "labels": {"managedFields": [{"x": "]"}]}},
            "spec": {"managedFields": [{"y": 1}]}}
    other = {"metadata": {"name": "b", "managedFields": [{"manager": "m"}]}}
    body = json.dumps({"items": [other, item, other]})
    cut, cuts = kubernetes._cut_managed_fields(body)
    assert len(cuts) == 4  # cut, then found not to be the metadata's: decoded again
    assert list(kubernetes._list_items(body, {})) == [
        {"metadata": {"name": "b"}}, item, {"metadata": {"name": "b"}}]


def test_a_managed_fields_that_is_not_an_array_leaves_the_page_uncut():
    body = json.dumps({"items": [{"metadata": {"managedFields": [{"manager": "m"}]}},
                                 {"metadata": {"managedFields": None}}]})
    assert kubernetes._cut_managed_fields(body) == (body, [])
    assert list(kubernetes._list_items(body, {})) == json.loads(body)["items"]
