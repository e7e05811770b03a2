"""PTB tokenisation: pycocoevalcap's PTBTokenizer = Stanford CoreNLP 3.4.1 PTBLexer run with
"-preserveLines -lowerCase", then removal of its PUNCTUATIONS tokens. The lexer rules below are
transcribed from PTBLexer.flex (v3.4.1, default options: PTB3 escaping, latex quotes, no
americanize, split assimilations) in the same order; JFlex picks the longest match over all rules,
counting trailing context (r1/r2) in the length, ties going to the earlier rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# JFlex [:letter:] / [:digit:] are Java's isLetter / isDigit. Python's \w also holds non-decimal
# numerics (superscripts, vulgar fractions, circled numbers), excluded here.
_NOT_LETTERS = (
    r"\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF\u2776-\u2793\u3007\u3021-\u3029"
)
_L = rf"[^\W\d_{_NOT_LETTERS}]"
_LD = rf"[^\W_{_NOT_LETTERS}]"
_LETTER = (
    rf"(?:{_L}|&[aeiouAEIOU](?i:acute|grave|uml);|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF"
    r"\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487"
    r"\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7"
    r"\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F"
    r"\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955"
    r"\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03"
    r"\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD"
    r"\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC"
    r"\u0EC8-\u0ECD])"
)
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_APOS = r"(?:['\u0092\u2019]|&(?i:apos);)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACENL = r"[ \t\u00A0\u2000-\u200A\u3000\n\r\u2028\u2029\u000B\u000C\u0085]"
_SGML = (
    r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
    r"[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|[A-Za-z][A-Za-z0-9_:.\-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>"
)
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|[A-Z\u00C0-\u00D6\u00D8-\u00DE]|{_SGML})"
_NUM = r"\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_THINGA = r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
# Python alternation takes the first alternative that fits, JFlex the longest: longer ones go first.
_ACRO_SPECIAL = r"(?i:U\.S\.-(?:U\.K|U\.S\.S\.R)|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S)"
_ACRO = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])*)"
_ACRO2 = rf"(?:{_ACRO_SPECIAL}|[A-Za-z](?:\.[A-Za-z])+)"
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00AD]+))+"
# Abbreviation lists; a bracketed capital ("[M]iss") is case-sensitive in the lexer.
_ABSTATE = (
    r"(?i:Ala|Ariz)|A(?i:z)|A(?i:rk)|(?i:Calif|Colo|Conn|Ct|Dak)|D(?i:el)|(?i:Fla|Ga)|I(?i:ll)"
    r"|(?i:Ind|Kans?|Ky)|L(?i:a)|M(?i:ass)|(?i:Md|Mich|Minn)|M(?i:iss)|(?i:Mo|Mont|Neb|Nev|Okla)"
    r"|O(?i:re)|P(?i:a)|(?i:Penn|Tenn)|T(?i:ex)|(?i:Va|Vt)|W(?i:ash)|(?i:Wisc?|Wyo)"
)
_ABBREV1 = (
    r"(?:(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri)"
    rf"|{_ABSTATE}|(?i:Inc|Cos?|Corp)|(?i:Pp?t)[ye](?i:s)?|(?i:Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl"
    r"|Sys|tel|est|ext|sq|Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq|Bldg))\."
)
_ABTITLE = (
    r"(?i:Mr|Mrs|Ms)|M(?i:iss)|(?i:Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj"
    r"|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
    r"|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc)"
)
_ABBREV4 = (
    rf"(?:{_ACRO}|{_ABTITLE}|(?i:vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|Dept)"
    r"|(?i:M)[ft](?i:g))"
)
_ACRONYM_FOLLOWERS = (
    r"(?:A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)"
    r"|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\.|s\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)"
    r"|S(?i:he|ince|o|ome|uch)|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)"
    rf"|Y(?i:et|ou)|{_SGML})"
)
_PHONE = (
    r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
    r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
)
_MISC_SYMBOL = (
    r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387"
    r"\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A"
    r"\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
    r"\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF"
    r"\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]"
)
_FILENAME = (
    rf"(?:{_LETTER}|\d)+(?:\.(?:{_LETTER}|\d)+)*\.(?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h"
    r"|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"
)
_PAREN_TOKENS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_QUOTE_MAPS = [
    (re.compile("[\u0091\u2018\u201b\u2039]"), "`"),
    (re.compile("[\u0092\u2019\u203a]"), "'"),
    (re.compile("[\u0093\u201c\u00ab]"), "``"),
    (re.compile("[\u0094\u201d\u00bb]"), "''"),
]


def _latex_quotes(left: bool) -> Callable[[str], list[str]]:
    single, double = ("`", "``") if left else ("'", "''")

    def convert(tok: str) -> list[str]:
        tok = re.sub("&apos;|'", single, tok)
        tok = re.sub('"|&quot;', double, tok)
        for pattern, repl in _QUOTE_MAPS:
            tok = pattern.sub(repl, tok)
        return [tok]

    return convert


def _same(tok: str) -> list[str]:
    return [tok]


def _desoft(tok: str) -> list[str]:
    return [tok.replace("\u00ad", "") or "-"]


def _amp(tok: str) -> list[str]:
    return [re.sub("(?i:&amp;)", "&", tok)]


def _nbsp(tok: str) -> list[str]:
    return [tok.replace(" ", "\u00a0")]


def _currency(tok: str) -> list[str]:
    return [re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok.replace("\u00a2", "cents").replace("\u00a3", "#"))]


def _parens(tok: str) -> list[str]:
    return [tok.replace("(", "-LRB-").replace(")", "-RRB-")]


def _with_period(tok: str) -> list[str]:
    # The lexer pushes the final period back and also returns it as a token of its own.
    return [tok, "."]


def _skip(tok: str) -> list[str]:
    return []


# (pattern, action): the pattern's group "tok" is the token text, the rest of the match is trailing
# context (it counts for the longest match but is scanned again).
_PTB_RULES: list[tuple[re.Pattern[str], Callable[[str], list[str]]]] = [
    (re.compile(p), action)
    for p, action in [
        (r"(?P<tok>(?i:c\+\+|[cf]#))", _same),
        (r"(?P<tok>(?i:can))(?i:not)", _same),
        (r"(?P<tok>'(?i:t))(?i:was|is)", _same),
        (r"(?=(?i:gonna|gotta|lemme|gimme|wanna))(?P<tok>\w{3})\w{2}", _same),
        (rf"(?P<tok>{_SGML})", _nbsp),
        (r"(?P<tok>&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015])", lambda t: ["--"]),
        (r"(?P<tok>&(?i:amp);)", _amp),
        (r"(?P<tok>&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);)", _same),
        (rf"(?P<tok>{_WORD}){_REDAUX}", _desoft),
        (rf"(?P<tok>[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*){_SREDAUX}", _desoft),
        (rf"(?P<tok>{_WORD})", _desoft),
        (rf"(?P<tok>{_APOS}(?i:n){_APOS}?)", _same),
        (rf"(?P<tok>[lLdDjJ]{_APOS}|(?i:Dunkin|somethin|ol){_APOS}|{_APOS}(?i:em))", _same),
        (rf"(?P<tok>[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*)", _same),
        (rf"(?P<tok>{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?))", _same),
        (rf"(?P<tok>{_L}{_L}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*)", _same),
        (rf"(?P<tok>{_APOS}(?i:cause)|(?i:cont'd)\.?)", _same),
        (r"(?P<tok>(?i:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l))", _same),
        (rf"(?P<tok>(?i:O){_APOSETC}(?i:o))", _same),
        (rf"(?P<tok>(?i:y){_APOS}){_L}", _same),
        (r"(?P<tok>(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-])", _same),
        (
            r"(?P<tok>(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
            r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
            r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?)",
            _same,
        ),
        (
            r"(?P<tok>(?:&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@"
            r"(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&(?i:gt);|>)?)",
            _same,
        ),
        (rf"(?P<tok>@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+)", _same),
        (rf"(?P<tok>{_REDAUX})[^A-Za-z]", _latex_quotes(False)),
        (rf"(?P<tok>{_SREDAUX})[^A-Za-z]", _latex_quotes(False)),
        (r"(?P<tok>\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4})", _same),
        (rf"(?P<tok>[\-+]?(?:{_NUM}))", _desoft),
        (
            r"(?P<tok>[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+))",
            _same,
        ),
        (r"(?P<tok>(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4})", _nbsp),
        (r"(?P<tok>[\u00BC\u00BD\u00BE\u2153-\u215E])", lambda t: [_FRACTIONS.get(t, t)]),
        (
            r"(?P<tok>-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-)|(?i:S)(?:&|&(?i:amp);)(?i:P-500)"
            rf"|(?i:S)(?:&|&(?i:amp);)(?i:Ls)|(?i:Cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est))",
            _amp,
        ),
        (r"(?P<tok>[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2})", _same),
        (r"(?P<tok>[A-Z]*\$|#)", _same),
        (
            r"(?P<tok>[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6])",
            _currency,
        ),
        # An acronym before a capitalised function word ends the sentence: "I." -> "I" ".", and
        # "U.S." -> "U.S." "." (the lexer pushes the period back and scans it again).
        (rf"(?P<tok>[A-Za-z])\.{_SPACENL}+{_ACRONYM_FOLLOWERS}{_SPACENL}", _same),
        (rf"(?P<tok>{_ACRO}\.){_SPACENL}+{_ACRONYM_FOLLOWERS}{_SPACENL}", _with_period),
        (rf"(?P<tok>(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.){_SPACENL}?\d", _same),
        (rf"(?P<tok>(?i:pt)[eyEY]\.|(?i:co)\.){_SPACE}(?i:ltd|lim)", _same),
        (rf"(?P<tok>{_ABBREV1}){_SENTEND}", _with_period),
        (rf"(?P<tok>{_ABBREV1})[\s\S]{{2}}", _same),
        (rf"(?P<tok>{_ABBREV1})", _with_period),
        (rf"(?P<tok>{_ABBREV4}\.)", _same),
        (rf"(?P<tok>{_ABBREV4}){_SPACE}", _same),
        (rf"(?P<tok>{_ACRO}){_SPACENL}", _same),
        (rf"(?P<tok>{_APOS}[0-9][0-9]){_SPACENL}", _same),
        (rf"(?P<tok>{_FILENAME})(?:{_SPACENL}|[.?!,])", _same),
        (rf"(?P<tok>{_WORD}\.)[,;:\u3001]", _desoft),
        (rf"(?P<tok>{_PHONE})", lambda t: _parens(_nbsp(t)[0])),
        (r"(?P<tok>\"|&(?i:quot);)[A-Za-z0-9$]", _latex_quotes(True)),
        (r"(?P<tok>\"|&(?i:quot);)", _latex_quotes(False)),
        (r"(?P<tok>\x7f)", _skip),
        (r"(?P<tok><|&(?i:lt);)", lambda t: ["<"]),
        (r"(?P<tok>>|&(?i:gt);)", lambda t: [">"]),
        (r"(?P<tok>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]", _parens),
        (
            r"(?P<tok>[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
            r"|\([\^x=~<>']-[\^x=~<>'`]\))",
            _parens,
        ),
        (r"(?P<tok>[(){}\[\]])", lambda t: [_PAREN_TOKENS[t]]),
        (r"(?P<tok>-+)", lambda t: ["--" if 3 <= len(t) <= 4 else t]),
        (r"(?P<tok>\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026])", lambda t: ["..."]),
        (r"(?P<tok>@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:\u3001]|[?!]+)", _same),
        (r"(?P<tok>[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002=/])", _same),
        (rf"(?P<tok>{_HTHING}\.)[,;:\u3001]", _desoft),
        (rf"(?P<tok>{_HTHING})", _desoft),
        (rf"(?P<tok>{_THING}\.)[,;:\u3001]", _same),
        (rf"(?P<tok>{_THING})", _same),
        (rf"(?P<tok>{_THINGA}\.)[,;:\u3001]", _amp),
        (rf"(?P<tok>{_THINGA})", _amp),
        (r"(?P<tok>')[A-Za-z][^ \t\n\r\u00A0]", _latex_quotes(True)),
        (
            rf"(?P<tok>{_REDAUX}|{_SREDAUX}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092"
            rf"\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{{1,2}}|{_APOS})",
            _latex_quotes(False),
        ),
        (rf"(?P<tok><<|>>|{_MISC_SYMBOL})", _same),
        (r"(?P<tok>\x00|[ \t\u00A0\u2000-\u200A\u3000]+|[\u200B\u200E\u200F\uFEFF])", _skip),
        # Line breaks become "*NL*" tokens with -preserveLines; pycocoevalcap has replaced "\n".
        (r"(?P<tok>\r|\r?\n|[\u2028\u2029\u000B\u000C\u0085])", _skip),
        (r"(?P<tok>&(?i:nbsp);)", _skip),
    ]
]
# Shortcut for the lexer's SPACES and NEWLINE rules: no other rule starts with a space, tab or line
# break. A run of spaces is one match, so a no-break space after a space cannot open a URL token.
_PTB_SPACES = re.compile(r"[ \t\u00A0\u2000-\u200A\u3000]+|[\n\r\x0c]")
# pycocoevalcap's PTBTokenizer.PUNCTUATIONS. It is compared with the lower-cased output, so the
# bracket tokens -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- are kept, as in the official evaluation.
_PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def _ptb_lex(text: str) -> list[str]:
    """Scan as JFlex does: at each position the longest match over all rules, the earliest on ties."""
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] in " \t\n\r\x0c":
            pos = _PTB_SPACES.match(text, pos).end()
            continue
        best: tuple[Callable[[str], list[str]], str] | None = None
        best_len = 0
        for pattern, action in _PTB_RULES:
            m = pattern.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best, best_len = (action, m.group("tok")), m.end() - pos
        if best is None:  # untokenizable character: deleted (the lexer's default "firstDelete")
            pos += 1
            continue
        action, tok = best
        tokens.extend(action(tok))
        pos += len(tok)
    return tokens


def ptb_tokenize(text: str) -> str:
    """Tokenise a caption as pycocoevalcap's ``PTBTokenizer`` does, without Java.

    That tokenizer runs Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` on the
    caption (newlines replaced by spaces) and drops the tokens of its ``PUNCTUATIONS`` list. This is
    a transcription of the 3.4.1 lexer rules: contractions are split ("don't" -> "do n't", "it's" ->
    "it 's", "cannot" -> "can not", "gonna" -> "gon na"), hyphenated words and numbers stay whole,
    quotes become `` / '' and are dropped with . , ; : ? ! - -- ..., brackets become -lrb- -rrb- and
    are kept, abbreviations such as "mr." or "u.s." keep their period. Returns the space-joined
    lower-cased tokens. Other line-break characters (\\r, U+2028, ...) are treated as spaces
    (pycocoevalcap would shift its lines on them). Not reproducible per caption: the lexer also sees
    the start of the next caption of pycocoevalcap's file, which changes the token only for a
    caption ending in a single letter or "no."-like abbreviation with a period ("plan b." stays
    "b." here, while Java splits it when the next caption starts with "A", "The", a digit, ...).
    """
    # In pycocoevalcap every caption is followed by a newline (the next line of the file): it is
    # trailing context for some rules ("we've" -> "we 've" rather than "we ve").
    tokens = _ptb_lex(text.replace("\n", " ") + "\n")
    # Java's toLowerCase(Locale.ENGLISH) and str.lower() agree on the text such captions contain.
    line = " ".join(tokens).lower()
    return " ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATIONS)
