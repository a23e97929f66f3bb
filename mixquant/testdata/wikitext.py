"""The test text: the gensim Wikipedia test extract, cleaned to wikitext style (`= Title =` page
headings, `= = H = =` section headings, markup stripped with gensim's own filter_wiki rules,
bold/italic quotes removed) and split 60/40 by characters. It comes to 3,087,425 characters; the
extract behind shared/anchors.md had 3,086,012 (same recipe as described there; its exact whitespace
handling is not recorded, so the last 0.05% could not be reproduced):

    build_test_text()   -> (cache_dir() / "text" / "calib.txt", cache_dir() / "text" / "eval.txt")

gensim is not imported (it needs scipy, which mixquant does not install): the dump is located with
importlib.util.find_spec.
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Iterator
from html.entities import name2codepoint
from pathlib import Path
from xml.etree.ElementTree import iterparse

from ..cache import cache_dir
from .fixture import build_lock, package_dir, write_atomic

WIKI_DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIB_FRACTION = (3, 5)  # the first 60% of characters is calibration text, the rest evaluation text


def source_wiki_dump() -> Path:
    """The shortened English Wikipedia dump shipped in the `gensim` wheel's test data."""
    path = package_dir("gensim", "pip install --no-deps gensim==4.4.0") / "test" / "test_data" / WIKI_DUMP_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim==4.4.0")
    return path


# --------------------------------------------------------------------------------------------------
# The text: gensim's markup filter, ported (gensim/corpora/wikicorpus.py, gensim/utils.py 4.4.0)

_RE_P0 = re.compile(r'<!--.*?-->', re.DOTALL | re.UNICODE)  # comments
_RE_P1 = re.compile(r'<ref([> ].*?)(</ref>|/>)', re.DOTALL | re.UNICODE)  # footnotes
_RE_P2 = re.compile(r'(\n\[\[[a-z][a-z][\w-]*:[^:\]]+\]\])+$', re.UNICODE)  # links to languages
_RE_P5 = re.compile(r'\[(\w+):\/\/(.*?)(( (.*?))|())\]', re.UNICODE)  # urls, keep description
_RE_P6 = re.compile(r'\[([^][]*)\|([^][]*)\]', re.DOTALL | re.UNICODE)  # links, keep description
_RE_P9 = re.compile(r'<nowiki([> ].*?)(</nowiki>|/>)', re.DOTALL | re.UNICODE)
_RE_P10 = re.compile(r'<math([> ].*?)(</math>|/>)', re.DOTALL | re.UNICODE)
_RE_P11 = re.compile(r'<(.*?)>', re.DOTALL | re.UNICODE)  # all other tags
_RE_P12 = re.compile(r'(({\|)|(\|-(?!\d))|(\|}))(.*?)(?=\n)', re.UNICODE)  # table formatting
_RE_P13 = re.compile(r'(?<=(\n[ ])|(\n\n)|([ ]{2})|(.\n)|(.\t))(\||\!)([^[\]\n]*?\|)*', re.UNICODE)  # table cells
_RE_P14 = re.compile(r'\[\[Category:[^][]*\]\]', re.UNICODE)  # categories
_RE_P15 = re.compile(r'\[\[([fF]ile:|[iI]mage)[^]]*(\]\])', re.UNICODE)  # file and image markup
_RE_P17 = re.compile(
    r'(\n.{0,4}((bgcolor)|(\d{0,1}[ ]?colspan)|(rowspan)|(style=)|(class=)|(align=)|(scope=))(.*))|'
    r'(^.{0,2}((bgcolor)|(\d{0,1}[ ]?colspan)|(rowspan)|(style=)|(class=)|(align=))(.*))',
    re.UNICODE,
)  # table markup
_RE_HTML_ENTITY = re.compile(r'&(#?)([xX]?)(\w{1,8});', re.UNICODE)
_IGNORED_NAMESPACES = ('Wikipedia', 'Category', 'File', 'Portal', 'Template', 'MediaWiki', 'User', 'Help',
                       'Book', 'Draft', 'WikiProject', 'Special', 'Talk')
_RE_TOKEN = re.compile(r'((?![\d])\w)+', re.UNICODE)  # gensim.utils.PAT_ALPHABETIC
_ARTICLE_MIN_TOKENS = 50  # gensim WikiCorpus: shorter articles (redirects, stubs) are dropped


def _decode_htmlentities(text: str) -> str:
    def substitute(match: re.Match) -> str:
        try:
            ent = match.group(3)
            if match.group(1) == "#":
                if match.group(2) == '':
                    return chr(int(ent))
                if match.group(2) in ('x', 'X'):
                    return chr(int(ent, 16))
            else:
                cp = name2codepoint.get(ent)
                if cp:
                    return chr(cp)
        except Exception:
            pass
        return match.group()

    return _RE_HTML_ENTITY.sub(substitute, text)


def _remove_template(s: str) -> str:
    n_open, n_close = 0, 0
    starts, ends = [], [-1]
    in_template = False
    prev_c = None
    for i, c in enumerate(s):
        if not in_template:
            if c == '{' and c == prev_c:
                starts.append(i - 1)
                in_template = True
                n_open = 1
        if in_template:
            if c == '{':
                n_open += 1
            elif c == '}':
                n_close += 1
            if n_open == n_close:
                ends.append(i)
                in_template = False
                n_open, n_close = 0, 0
        prev_c = c
    starts.append(None)
    return ''.join(s[end + 1:start] for end, start in zip(ends, starts))


def _remove_file(s: str) -> str:
    for match in re.finditer(_RE_P15, s):
        m = match.group(0)
        caption = m[:-2].split('|')[-1]
        s = s.replace(m, caption, 1)
    return s


def _remove_markup(text: str) -> str:
    text = re.sub(_RE_P2, '', text)
    text = _remove_template(text)
    text = _remove_file(text)
    iters = 0
    while True:
        old, iters = text, iters + 1
        text = re.sub(_RE_P0, '', text)
        text = re.sub(_RE_P1, '', text)
        text = re.sub(_RE_P9, '', text)
        text = re.sub(_RE_P10, '', text)
        text = re.sub(_RE_P11, '', text)
        text = re.sub(_RE_P14, '', text)
        text = re.sub(_RE_P5, '\\3', text)
        text = re.sub(_RE_P6, '\\2', text)
        text = text.replace("!!", "\n|")
        text = text.replace("|-||", "\n|")
        text = re.sub(_RE_P12, '\n', text)
        text = text.replace('|||', '|\n|')
        text = text.replace('||', '\n|')
        text = re.sub(_RE_P13, '\n', text)
        text = re.sub(_RE_P17, '\n', text)
        text = text.replace('[]', '')
        if old == text or iters > 2:
            break
    return text.replace('[', '').replace(']', '')


def filter_wiki(raw: str) -> str:
    """gensim.corpora.wikicorpus.filter_wiki (promote_remaining and simplify_links on)."""
    return _remove_markup(_decode_htmlentities(raw))


def _gensim_token_count(text: str) -> int:
    """len(gensim.corpora.wikicorpus.tokenize(text)): lower-cased alphabetic tokens of 2..15 characters."""
    return sum(1 for m in _RE_TOKEN.finditer(text.lower())
               if 2 <= len(m.group()) <= 15 and not m.group().startswith('_'))


def wiki_articles(path: Path | None = None) -> Iterator[tuple[str, str]]:
    """(title, filtered text) of each article gensim's WikiCorpus keeps: namespace 0, not a redirect
    or stub (at least 50 tokens after filtering), not in an ignored namespace; in dump order."""
    with bz2.open(path or source_wiki_dump()) as fh:
        elems = (elem for _, elem in iterparse(fh, events=("end",)))
        first = next(elems)
        m = re.match("^{(.*?)}", first.tag)
        ns = m.group(1) if m else ""
        page_tag = f"{{{ns}}}page"
        for elem in elems:
            if elem.tag != page_tag:
                continue
            title = elem.find(f"./{{{ns}}}title").text or ""
            text = elem.find(f"./{{{ns}}}revision/{{{ns}}}text").text or ""
            namespace = elem.find(f"./{{{ns}}}ns").text
            elem.clear()
            if namespace != "0" or any(title.startswith(ignore + ':') for ignore in _IGNORED_NAMESPACES):
                continue
            text = filter_wiki(text)
            if _gensim_token_count(text) < _ARTICLE_MIN_TOKENS:
                continue
            yield title, text


_RE_HEADING = re.compile(r'^(=+)[ \t]*(.+?)[ \t]*\1[ \t]*$', re.MULTILINE)


def _spaced_heading(m: re.Match) -> str:
    bar = " ".join(m.group(1))
    return f"{bar} {m.group(2)} {bar}"


def clean_wiki_text(title: str, text: str) -> str:
    """One article in wikitext style: `= Title =`, a blank line, then its (filtered) text with the
    bold/italic quotes removed, headings `==H==` written `= = H = =`, runs of blank lines collapsed."""
    text = text.replace("'''", "").replace("''", "")
    text = _RE_HEADING.sub(_spaced_heading, text)
    text = re.sub(r'\n{3,}', '\n\n', text).strip()
    return f"= {title} =\n\n{text}\n"


def cleaned_text(path: Path | None = None, progress: bool = False) -> str:
    """The whole cleaned extract: the articles, separated by a blank line."""
    from tqdm import tqdm

    articles = tqdm(wiki_articles(path), desc="test text", unit="article", disable=not progress, leave=False)
    return "\n".join(clean_wiki_text(title, text) for title, text in articles)


def build_test_text(force: bool = False) -> tuple[Path, Path]:
    """Write the cleaned extract's first 60% of characters to calib.txt and the rest to eval.txt, once."""
    folder = cache_dir() / "text"
    calib, evaluation = folder / "calib.txt", folder / "eval.txt"
    if not force and calib.is_file() and evaluation.is_file():
        return calib, evaluation
    folder.mkdir(parents=True, exist_ok=True)
    with build_lock("text"):
        if force or not (calib.is_file() and evaluation.is_file()):
            text = cleaned_text(progress=True)
            cut = len(text) * CALIB_FRACTION[0] // CALIB_FRACTION[1]
            # eval first: calib.txt present means both are
            write_atomic(evaluation, lambda tmp: tmp.write_text(text[cut:], encoding="utf-8", newline=""))
            write_atomic(calib, lambda tmp: tmp.write_text(text[:cut], encoding="utf-8", newline=""))
    return calib, evaluation

