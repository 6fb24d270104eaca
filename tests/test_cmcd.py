"""The CMCD reader (peerd.core.cmcd), alone and synchronous: what hls.js 1.7.4 sends, what is
refused, and (fuzzed) that it never raises and its output stays bounded."""

from __future__ import annotations

from urllib.parse import quote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.core.cmcd import MAX_STRING, MAX_VALUE, Cmcd, CmcdError, parse, parse_headers
from tests.support import cmcd_reference

# As hls.js 1.7.4 (cmcd: {}) writes a video segment request's data: sorted keys, integers
# rounded, nor URL-encoded inside a string, su bare, sid a UUID.
HLSJS = (
    'bl=4200,br=1306,d=4000,dl=4200,mtp=48700,nor="s%2Fv0%2F3.m4s%3Ftoken%3Da.b",ot=v,'
    'rtp=6500,sf=h,sid="0b5bd7ae-5d3e-4c8f-9f0c-5a1d6c4e7f21",st=v,su,tb=1306'
)


def test_what_hlsjs_sends_in_the_query() -> None:
    got = parse(HLSJS)
    assert got == Cmcd(
        bl=4200, br=1306, d=4000, dl=4200, mtp=48700, nor="s%2Fv0%2F3.m4s%3Ftoken%3Da.b",
        ot="v", rtp=6500, sf="h", sid="0b5bd7ae-5d3e-4c8f-9f0c-5a1d6c4e7f21", st="v", su=True,
        tb=1306,
    )  # fmt: skip
    # The fast path sees it as URLSearchParams.set encoded it.
    raw = urlencode({"token": "x", "CMCD": HLSJS}).split("&CMCD=")[1]
    assert "%" in raw
    assert parse(raw, encoded=True) == got


def test_what_hlsjs_sends_in_headers() -> None:
    headers = {
        "cmcd-object": "br=1306,d=4000,ot=v,tb=1306",
        "cmcd-request": "bl=4200,dl=4200,mtp=48700,su",
        "cmcd-session": 'cid="movie",sf=h,sid="s1",st=v',
        "cmcd-status": "bs,pr=1.25,rtp=6500",
    }
    got = parse_headers(headers)
    assert got == Cmcd(
        bl=4200, br=1306, bs=True, cid="movie", d=4000, dl=4200, mtp=48700, ot="v", pr=1.25,
        rtp=6500, sf="h", sid="s1", st="v", su=True, tb=1306,
    )  # fmt: skip
    assert parse_headers({"accept": "*/*"}) is None


def test_booleans_strings_and_unknown_keys() -> None:
    assert parse("bs=?1,su=?0") == Cmcd(bs=True, su=False)
    assert parse('sid="a\\"b\\\\c"') == Cmcd(sid='a"b\\c')
    assert parse("com.example-x=5,zz=tok,yy=?1,v=1") == Cmcd(v=1)
    assert parse(" ot=av , pr=2 ,\tsu") == Cmcd(ot="av", pr=2.0, su=True)


@pytest.mark.parametrize(
    "value",
    [
        "", " ", "bl=-1", "bl=1.5", "bl=x", "bl", "bs=1", "ot=x", "ot=\"v\"", "sid=abc",
        f'sid="{"a" * 65}"', "v=2", "br=1,br=2", "br=1,", ",br=1", "br=1;a=2", "br=(1 2)",
        "BR=1", "br=1 br=2", "pr=0", "pr=-1", "bl=1234567890123456", 'sid="\u00e9"',
        'sid="a', "st=?2", "su=", "=1", "d=1.2345",
    ],
)  # fmt: skip
def test_refused(value: str) -> None:
    assert isinstance(parse(value), CmcdError)


@pytest.mark.parametrize(
    "value",
    [
        "br=1 ", "br=1\t,  su", "v=01", "v=001", "pr=0", "pr=0.5", "pr=100.001", "bs=?0,su=?1",
        "bl=007", 'nor="a\\\\b"', "ot=av,ot=v", "x=1,x=2", "a,b,c", "a=(1),b", "a=-1.5",
        "bl=1.0", "sid=\"\"", "d=123456789012345", "d=1234567890123456", "*=1", "a*b=?1",
        "st=l,sf=o", "ot=tt", "ot=avv", "ot=k ,", " ", "", "su,bs", "su=?2",
    ],
)  # fmt: skip
def test_agrees_with_the_reference(value: str) -> None:
    _same(parse(value), cmcd_reference.parse(value))
    _same(parse(quote(value), encoded=True), cmcd_reference.parse(quote(value), encoded=True))


def test_bounded() -> None:
    assert isinstance(parse("a," * (MAX_VALUE // 2 + 1)), CmcdError)
    assert isinstance(parse(",".join(f"k{i}" for i in range(65))), CmcdError)
    assert isinstance(parse(f'nor="{"a" * (MAX_STRING + 1)}"'), CmcdError)
    assert parse(f'nor="{"a" * MAX_STRING}"') == Cmcd(nor="a" * MAX_STRING)
    assert isinstance(parse("%ff", encoded=True), CmcdError)
    headers = {"cmcd-object": "a," * 1500 + "a", "cmcd-status": "b," * 1500 + "b"}
    assert isinstance(parse_headers(headers), CmcdError)


KEYS = st.sampled_from(
    ["bl", "br", "bs", "cid", "d", "dl", "mtp", "nor", "nrr", "ot", "pr", "rtp", "sf", "sid",
     "st", "su", "tb", "v", "x-y", "com.a"]
)  # fmt: skip
VALUES = st.one_of(
    st.integers(-(10**16), 10**16).map(str),
    st.decimals(-1000, 1000, places=3, allow_nan=False).map(str),
    st.sampled_from(["?0", "?1", "v", "av", "h", "l", "tok", "(1 2)", "1;a=b", ""]),
    st.text(max_size=80).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.text(max_size=20),
)
MEMBER = st.tuples(KEYS, st.none() | VALUES).map(
    lambda kv: kv[0] + ("" if kv[1] is None else "=" + kv[1])
)
DICT = st.lists(MEMBER, max_size=24).map(",".join) | st.text(max_size=200)


def _same(got: Cmcd | CmcdError | None, want: Cmcd | CmcdError | None) -> None:
    """The reader agrees with the straightforward reference (errors: any reason)."""
    if isinstance(want, CmcdError):
        assert isinstance(got, CmcdError), (got, want)
    else:
        assert got == want


def _bounded(got: Cmcd | CmcdError | None) -> None:
    assert got is None or isinstance(got, Cmcd | CmcdError)
    if isinstance(got, Cmcd):
        for name in ("cid", "sid"):
            assert len(getattr(got, name) or "") <= 64
        for name in ("nor", "nrr"):
            assert len(getattr(got, name) or "") <= MAX_STRING
        for name in ("bl", "br", "d", "dl", "mtp", "rtp", "tb"):
            n = getattr(got, name)
            assert n is None or 0 <= n < 10**15
        assert got.v in (None, 1)
        assert got.ot in (None, "m", "a", "v", "av", "i", "c", "tt", "k", "o")


@settings(max_examples=1500, deadline=None)
@given(DICT, st.booleans())
def test_fuzz_query_never_raises_and_stays_bounded(value: str, encoded: bool) -> None:
    raw = quote(value) if encoded else value
    got = parse(raw, encoded=encoded)
    _bounded(got)
    _same(got, cmcd_reference.parse(raw, encoded=encoded))


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["cmcd-object", "cmcd-request", "cmcd-session",
                                        "cmcd-status", "x"]), DICT, max_size=5))  # fmt: skip
def test_fuzz_headers_never_raise_and_stay_bounded(headers: dict[str, str]) -> None:
    got = parse_headers(headers)
    _bounded(got)
    _same(got, cmcd_reference.parse_headers(headers))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_encoded_bytes(raw: bytes) -> None:
    text = raw.decode("latin-1")
    got = parse(text, encoded=True)
    _bounded(got)
    _same(got, cmcd_reference.parse(text, encoded=True))
