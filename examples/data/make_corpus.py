"""Write ``harbour.txt``: the deterministic synthetic corpus the example trains on.

The text is the logbook of an invented harbour town, generated from a small grammar so that it
is original, free of copyright, and learnable at several levels: spelling and punctuation, a
fixed trade and catch-phrases per person, number words that agree with plural nouns, weather
that carries through a day's entry, day numbers that count up, and ledger sums that are
correct. A character-level model picks up the first levels within a few hundred steps; the
sums and long-range consistency need a larger model and more steps.

The file is committed; this script documents how it was made and reproduces it byte for byte
(``python examples/data/make_corpus.py``; the test suite checks that it still does).
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 1893
TARGET_CHARS = 250_000
PATH = Path(__file__).with_name("harbour.txt")

PEOPLE = {  # name -> (trade, pronoun, catch-phrases)
    "Mira": ("keeper of the light", "she", ["The lamp does not care who is watching.",
                                          "Trim the wick and trust the glass.",
                                          "A dark night is only a long evening."]),
    "Tomas": ("net mender", "he", ["Every knot remembers the hand that tied it.",
                                  "A torn net catches only stories.",
                                  "Mend it now or mend it twice."]),
    "Ilse": ("baker", "she", ["Bread waits for no tide.",
                             "Salt in the dough, salt in the air.",
                             "The oven is warm, so the town is warm."]),
    "Oskar": ("harbour master", "he", ["Ropes first, questions later.",
                                      "No boat leaves without a name in my book.",
                                      "The sea keeps its own ledger."]),
    "Brannagh": ("sail maker", "she", ["Wind is only patient air.",
                                      "A good seam is a quiet seam.",
                                      "Canvas forgives, but not twice."]),
    "Pell": ("cooper", "he", ["A barrel is a promise with hoops.",
                             "Oak swells when it is trusted.",
                             "Count the staves before you count the fish."]),
    "Wenna": ("herbalist", "she", ["Thyme for the cough, rue for the rest.",
                                  "The hill garden knows the weather first.",
                                  "Dry it in shade, never in sun."]),
    "Corvin": ("schoolmaster", "he", ["Twelve times twelve is still a gross.",
                                     "Chalk is cheaper than mistakes.",
                                     "Spell the boat before you sail it."]),
    "Alys": ("fish seller", "she", ["Fresh at dawn, cheap at dusk.",
                                   "Herring for the poor, turbot for the priest.",
                                   "My scales are honest and so is my tongue."]),
    "Rudd": ("ferryman", "he", ["The far shore is always nearer than it looks.",
                               "Pay on the water, not on the quay.",
                               "Fog is a wall you can row through."]),
}
PLACES = ["the north pier", "the old mill", "the salt market", "the chapel steps",
          "the lighthouse stair", "the ropewalk", "the customs house", "the herring sheds",
          "the hill garden", "the ferry slip", "the school yard", "the bakery door"]
THINGS = [("net", "nets"), ("barrel", "barrels"), ("lantern", "lanterns"), ("loaf", "loaves"),
          ("crab", "crabs"), ("rope", "ropes"), ("sail", "sails"), ("gull", "gulls"),
          ("bottle", "bottles"), ("herring", "herrings"), ("key", "keys"), ("letter", "letters")]
COLOURS = ["red", "blue", "green", "grey", "white", "black", "yellow", "brown"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve"]
VERBS = ["found", "carried", "counted", "mended", "sold", "painted", "lost", "washed"]
WEATHER = {  # kind -> (morning line, consequence)
    "rain": ("a cold rain from the {d}", "The boats stayed tied because of the rain."),
    "fog": ("a thick fog rolling in from the {d}", "Rudd rang the fog bell every hour."),
    "sun": ("clear sun and a light breeze from the {d}", "Every boat was out before noon."),
    "gale": ("a gale from the {d}", "Oskar doubled the ropes on every mooring."),
    "snow": ("wet snow drifting from the {d}", "The market closed early and the chimneys smoked."),
}
DIRECTIONS = ["north", "south", "east", "west", "north-east", "north-west", "south-east",
              "south-west"]
SEASONS = [("spring", ["rain", "fog", "sun"]), ("summer", ["sun", "sun", "fog"]),
           ("autumn", ["rain", "gale", "fog"]), ("winter", ["snow", "gale", "rain"])]
DAYS_PER_SEASON = 30


def counted(rng: random.Random, noun: tuple[str, str]) -> str:
    n = rng.randrange(1, 13)
    return f"{NUMBERS[n - 1]} {rng.choice(COLOURS)} {noun[0] if n == 1 else noun[1]}"


def entry(rng: random.Random, day: int) -> str:
    year, day_of_year = divmod(day, 4 * DAYS_PER_SEASON)
    season, kinds = SEASONS[day_of_year // DAYS_PER_SEASON]
    kind = rng.choice(kinds)
    morning, consequence = WEATHER[kind]
    wind = rng.randrange(2, 15) if kind != "gale" else rng.randrange(30, 60)
    lines = [f"== Day {day_of_year + 1} of {season}, year {year + 1} ==",
             f"Weather: {morning.format(d=rng.choice(DIRECTIONS))}, wind {wind} knots.",
             consequence]
    for name in rng.sample(sorted(PEOPLE), rng.randrange(2, 5)):
        trade, pronoun, phrases = PEOPLE[name]
        place = rng.choice(PLACES)
        lines.append(f"{name} the {trade} went to {place} and {rng.choice(VERBS)} "
                     f"{counted(rng, rng.choice(THINGS))}.")
        if rng.random() < 0.5:
            lines.append(f'{pronoun.capitalize()} said: "{rng.choice(phrases)}"')
    a, b = rng.randrange(10, 90), rng.randrange(10, 90)
    c = rng.randrange(1, min(a + b, 99))
    lines.append(f"Ledger: {a} + {b} = {a + b} fish landed; {a + b} - {c} = {a + b - c} kept.")
    return "\n".join(lines) + "\n\n"


def make_corpus(seed: int = SEED, target_chars: int = TARGET_CHARS) -> str:
    rng = random.Random(seed)
    parts, size, day = [], 0, 0
    while size < target_chars:
        parts.append(entry(rng, day))
        size += len(parts[-1])
        day += 1
    return "".join(parts)


if __name__ == "__main__":
    PATH.write_text(make_corpus(), encoding="ascii")
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes)")
