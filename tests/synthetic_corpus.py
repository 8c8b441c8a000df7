"""A synthetic English -> German-like parallel corpus, generated deterministically for the tests.

The English side comes from a small grammar: [adverb] subject verb [object] [place] [because-clause],
where a noun phrase is a determiner or number, optional size and colour adjectives and a noun.
The target side is a fixed word dictionary plus German-like rules a small model can learn:
nouns carry a gender and are capitalised; determiners and adjective endings agree with gender,
number and case (subject nominative, object accusative, after a preposition dative); a fronted
adverb puts the verb second; the verb of a because-clause goes to its end.
The vocabulary holds a few hundred words on each side, and the same seed gives the same lines.
"""

from __future__ import annotations

import random
from pathlib import Path

# english:german:gender (m, f, n); German plurals follow the gender (m +e, f +en, n +er)
PEOPLE = """man:mann:m woman:frau:f child:kind:n girl:mädchen:n boy:junge:m dog:hund:m cat:katze:f
horse:pferd:n bird:vogel:m worker:arbeiter:m player:spieler:m teacher:lehrer:m doctor:ärztin:f
singer:sänger:m cook:koch:m farmer:bauer:m student:student:m dancer:tänzerin:f driver:fahrer:m
baby:baby:n cow:kuh:f sheep:schaf:n fish:fisch:m mouse:maus:f friend:freund:m""".split()
THINGS = """ball:ball:m bike:fahrrad:n car:auto:n book:buch:n hat:hut:m shirt:hemd:n bag:tasche:f
cup:tasse:f apple:apfel:m flower:blume:f guitar:gitarre:f box:kiste:f kite:drachen:m chair:stuhl:m
table:tisch:m picture:bild:n letter:brief:m stone:stein:m rope:seil:n boat:boot:n drum:trommel:f
camera:kamera:f ladder:leiter:f umbrella:schirm:m phone:telefon:n sign:schild:n basket:korb:m""".split()
PLACES = """street:straße:f park:park:m beach:strand:m garden:garten:m house:haus:n field:feld:n
river:fluss:m lake:see:m city:stadt:f forest:wald:m market:markt:m school:schule:f snow:schnee:m
grass:gras:n water:wasser:n stage:bühne:f bridge:brücke:f hill:hügel:m road:weg:m room:zimmer:n
kitchen:küche:f shop:laden:m station:bahnhof:m village:dorf:n""".split()
IRREGULAR = {"man": "men", "woman": "women", "child": "children", "mouse": "mice", "sheep": "sheep",
             "fish": "fish", "baby": "babies", "city": "cities"}
# english base form:german stem (3rd person singular stem+t, plural stem+en)
TRANSITIVE = """see:seh hold:halt carry:trag watch:beobacht find:find throw:werf catch:fang push:schieb
pull:zieh paint:mal buy:kauf sell:verkauf wash:wasch open:öffn follow:folg touch:berühr hear:hör
take:nehm bring:bring drop:fall""".split()
INTRANSITIVE = """run:lauf walk:geh sit:sitz stand:steh sleep:schlaf play:spiel dance:tanz sing:sing
jump:spring wait:wart work:arbeit laugh:lach swim:schwimm rest:ruh climb:kletter""".split()
SIZES = "big:groß small:klein old:alt young:jung tall:hoch happy:froh tired:müd little:winzig".split()
COLOURS = """red:rot blue:blau green:grün black:schwarz white:weiß yellow:gelb brown:braun grey:grau
pink:rosa orange:orang""".split()
NUMBERS = "two:zwei three:drei four:vier five:fünf six:sechs seven:sieben".split()
ADVERBS = "today:heute now:jetzt later:später again:wieder often:oft sometimes:manchmal".split()
PREPOSITIONS = "in:in on:auf near:neben behind:hinter under:unter with:mit".split()

ARTICLES = {  # (definite, case, gender or "pl") -> German determiner
    (True, "nom", "m"): "der", (True, "nom", "f"): "die", (True, "nom", "n"): "das", (True, "nom", "pl"): "die",
    (True, "acc", "m"): "den", (True, "acc", "f"): "die", (True, "acc", "n"): "das", (True, "acc", "pl"): "die",
    (True, "dat", "m"): "dem", (True, "dat", "f"): "der", (True, "dat", "n"): "dem", (True, "dat", "pl"): "den",
    (False, "nom", "m"): "ein", (False, "nom", "f"): "eine", (False, "nom", "n"): "ein",
    (False, "acc", "m"): "einen", (False, "acc", "f"): "eine", (False, "acc", "n"): "ein",
    (False, "dat", "m"): "einem", (False, "dat", "f"): "einer", (False, "dat", "n"): "einem",
}


def _pairs(words: list[str]) -> list[list[str]]:
    return [w.split(":") for w in words]


def _en_plural(noun: str) -> str:
    if noun in IRREGULAR:
        return IRREGULAR[noun]
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _de_plural(noun: str, gender: str) -> str:
    return noun + {"m": "e", "f": "n" if noun.endswith("e") else "en", "n": "er"}[gender]


def _en_verb(base: str, plural: bool) -> str:
    if plural:
        return base
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ies"
    return base + ("es" if base.endswith(("s", "sh", "ch", "x")) else "s")


def _adjective_ending(definite: bool, case: str, gender: str) -> str:
    """German-like agreement: weak endings after 'the', strong-looking ones after 'a', -en in the plural."""
    if gender == "pl" or case == "dat":
        return "en"
    if definite:
        return "en" if (case, gender) == ("acc", "m") else "e"
    return {"m": "er" if case == "nom" else "en", "f": "e", "n": "es"}[gender]


class _Grammar:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def noun_phrase(self, nouns: list[list[str]], case: str) -> tuple[list[str], list[str], bool]:
        """(english words, german words, plural) of one noun phrase."""
        rng = self.rng
        en_noun, de_noun, gender = rng.choice(nouns)
        adjectives = [rng.choice(SIZES).split(":")] if rng.random() < 0.3 else []
        if rng.random() < 0.4:
            adjectives.append(rng.choice(COLOURS).split(":"))
        plural = rng.random() < 0.3
        definite = plural or rng.random() < 0.5
        if plural:
            en_number, de_number = rng.choice(NUMBERS).split(":") if rng.random() < 0.6 else ("the", None)
            en = [en_number, *(a for a, _ in adjectives), _en_plural(en_noun)]
            det = de_number or ARTICLES[(True, case, "pl")]
            endings = "en" if de_number is None else "e"
            de = [det, *(g + endings for _, g in adjectives), _de_plural(de_noun, gender).capitalize()]
            return en, de, True
        en_det = "the" if definite else ("an" if (adjectives[0][0] if adjectives else en_noun)[0] in "aeiou" else "a")
        ending = _adjective_ending(definite, case, gender)
        de = [ARTICLES[(definite, case, gender)], *(g + ending for _, g in adjectives), de_noun.capitalize()]
        return [en_det, *(a for a, _ in adjectives), en_noun], de, False

    def clause(self) -> tuple[list[str], list[str], list[str], list[str]]:
        """English words, German subject, German verb, German rest (object and place)."""
        rng = self.rng
        en_subj, de_subj, plural = self.noun_phrase(_pairs(PEOPLE), "nom")
        transitive = rng.random() < 0.6
        en_verb, de_stem = rng.choice(_pairs(TRANSITIVE if transitive else INTRANSITIVE))
        en = [*en_subj, _en_verb(en_verb, plural)]
        de_rest: list[str] = []
        if transitive:
            en_obj, de_obj, _ = self.noun_phrase(_pairs(THINGS + PEOPLE), "acc")
            en += en_obj
            de_rest += de_obj
        if rng.random() < 0.5:
            en_prep, de_prep = rng.choice(_pairs(PREPOSITIONS))
            en_place, de_place, _ = self.noun_phrase(_pairs(PLACES), "dat")
            en += [en_prep, *en_place]
            de_rest += [de_prep, *de_place]
        return en, de_subj, [de_stem + ("en" if plural else "t")], de_rest

    def sentence(self) -> tuple[str, str]:
        rng = self.rng
        en, de_subj, de_verb, de_rest = self.clause()
        if rng.random() < 0.3:  # a fronted adverb: the German verb comes second
            en_adv, de_adv = rng.choice(_pairs(ADVERBS))
            en = [en_adv, *en]
            de = [de_adv, *de_verb, *de_subj, *de_rest]
        else:
            de = [*de_subj, *de_verb, *de_rest]
        if rng.random() < 0.1:  # a because-clause: the German verb goes to its end
            en_sub, sub_subj, sub_verb, sub_rest = self.clause()
            en = [*en, ",", "because", *en_sub]
            de = [*de, ",", "weil", *sub_subj, *sub_rest, *sub_verb]
        return _surface(en), _surface(de)


def _surface(words: list[str]) -> str:
    text = " ".join(words).replace(" ,", ",") + "."
    return text[0].upper() + text[1:]


SPLITS = {"train": 600, "val": 60, "test_2016_flickr": 40}


def sentence_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (english, german) pairs; the same seed gives the same pairs in the same order."""
    grammar, seen, pairs = _Grammar(random.Random(seed)), set(), []
    while len(pairs) < n:
        pair = grammar.sentence()
        if pair[0] not in seen:
            seen.add(pair[0])
            pairs.append(pair)
    return pairs


def write_corpus(out: Path, seed: int = 0, splits: dict[str, int] = SPLITS) -> Path:
    """{split}.en and {split}.de for each split in `out`, disjoint splits in the given order."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = iter(sentence_pairs(sum(splits.values()), seed))
    for split, n in splits.items():
        chunk = [next(pairs) for _ in range(n)]
        for side, lang in enumerate(("en", "de")):
            (out / f"{split}.{lang}").write_text("".join(p[side] + "\n" for p in chunk), encoding="utf-8")
    return out
