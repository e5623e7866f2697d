"""A deterministic corpus of >= 200 varied texts for accuracy checks (int8 vs fp32 embeddings).

``corpus(n)`` = the 53 hand-written SENTENCES (tests/data/sentences.py: 1 to 256 tokens, code, URLs,
several languages, emoji) followed by generated sentences: subject/verb/object/place templates over
several topics (so that nearest neighbours are meaningful but not trivial), questions, numbers and
dates, short fragments, multilingual lines, code/log lines and longer multi-clause texts.
"""
from __future__ import annotations

import random

from tests.data.sentences import SENTENCES

_SUBJECTS = ["A man", "A woman", "The child", "Two students", "An old farmer", "The engineer", "A small dog",
             "The chef", "My neighbour", "A group of tourists", "The doctor", "A cat", "The pilot", "Our teacher"]
_ACTIONS = [
    ("is playing", ["the guitar", "a violin", "football in the park", "chess with a friend", "the piano"]),
    ("is eating", ["a bowl of rice", "a slice of pizza", "fresh strawberries", "soup with bread", "an apple"]),
    ("is repairing", ["a bicycle", "the kitchen sink", "an old radio", "a broken laptop", "the roof"]),
    ("is reading", ["a mystery novel", "the morning newspaper", "a cookbook", "a letter from home",
                    "a paper on quantum computing"]),
    ("is driving", ["a red truck", "to the airport", "through heavy snow", "a school bus", "along the coast"]),
    ("is writing", ["a poem", "a report about climate change", "Python code", "an email to the bank",
                    "a shopping list"]),
]
_PLACES = ["", " in the garden", " at the station", " on a rainy afternoon", " near the river", " in Berlin",
           " late at night", " before breakfast"]
_QUESTIONS = [
    "How do I {v} {o}?", "What is the best way to {v} {o}?", "Why does my {o} keep failing?",
    "Can you recommend a good {o}?", "Where can I buy a cheap {o}?", "Is it safe to {v} {o} at home?",
]
_Q_VERBS = ["clean", "install", "update", "fix", "replace", "sell", "paint", "configure"]
_Q_OBJECTS = ["washing machine", "graphics card driver", "router", "car battery", "wooden floor", "laptop screen",
              "garden fence", "phone", "database server", "water heater"]
_FACTS = [
    "The meeting was moved from {d} to {d2} because {n} people could not attend.",
    "Revenue grew by {p}% in {y}, reaching {n} million dollars.",
    "The train leaves at {h}:{m:02d} from platform {k}.",
    "Order #{n} was shipped on {d} and should arrive within {k} days.",
    "The temperature dropped to -{k} degrees Celsius on {d}.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "March 3rd", "July 14th"]
_MULTI = [
    "Le chat dort sur le canapé pendant que la pluie tombe.", "Je voudrais réserver une table pour deux personnes.",
    "Der Zug nach München hat heute zwanzig Minuten Verspätung.", "Ich habe meinen Schlüssel im Büro vergessen.",
    "El mercado abre a las ocho de la mañana.", "¿Dónde está la biblioteca más cercana?",
    "Il gatto è salito sull'albero e non vuole scendere.", "O tempo está ótimo para uma caminhada na praia.",
    "今日はとても暑いので、冷たいお茶を飲みましょう。", "我明天要去北京参加一个会议。", "Москва — столица России.",
    "Ο καιρός σήμερα είναι πολύ ωραίος.",
]
_CODE = [
    "def add(a, b):\n    return a + b", "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 1;",
    "for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }", "ERROR 2024-05-01T12:03:44Z worker-3: connection reset by peer",
    "git commit -m 'fix off-by-one in tokenizer'", "https://example.com/api/v2/items?id=42&sort=desc",
    "pip install numpy==2.4.6 numba==0.68.1", "x = torch.randn(32, 128, 384); y = x @ w.T + b",
]
_FRAGMENTS = ["thanks", "no way!", "see you tomorrow", "great job", "what?", "I agree.", "maybe later",
              "lol", "42", "N/A", "good morning everyone", "out of stock"]
_LONG_TOPICS = [
    "Solar panels convert sunlight into electricity using semiconductor cells; their output depends on the angle "
    "of the panels, the temperature and the amount of dust on the surface, so owners clean them regularly.",
    "The recipe asks for two cups of flour, one egg, a pinch of salt and enough milk to make a smooth batter; "
    "let it rest for thirty minutes before frying thin pancakes in a hot pan with a little butter.",
    "After the update the application crashed on start-up for some users, and the team traced the problem to a "
    "race condition in the cache initialisation that only appeared on machines with many cores.",
    "The museum's new exhibition shows paintings from the early twentieth century, including several works that "
    "had been kept in private collections and were never displayed to the public before.",
    "Regular exercise improves sleep quality, lowers blood pressure and reduces stress, although the benefits "
    "depend on consistency more than on the intensity of any single workout.",
]


def corpus(n: int = 256, seed: int = 7) -> list[str]:
    """SENTENCES + generated texts, n in total (n >= len(SENTENCES)), deterministic for a seed."""
    rng = random.Random(seed)
    out = list(SENTENCES)
    pools = []
    for subj in _SUBJECTS:
        for verb, objects in _ACTIONS:
            for obj in objects:
                pools.append(("tpl", f"{subj} {verb} {obj}"))
    gen = []
    while len(out) + len(gen) < n:
        kind = rng.random()
        if kind < 0.40:
            base = rng.choice(pools)[1]
            gen.append(base + rng.choice(_PLACES) + ".")
        elif kind < 0.55:
            gen.append(rng.choice(_QUESTIONS).format(v=rng.choice(_Q_VERBS), o=rng.choice(_Q_OBJECTS)))
        elif kind < 0.65:
            gen.append(rng.choice(_FACTS).format(d=rng.choice(_DAYS), d2=rng.choice(_DAYS), n=rng.randint(2, 9999),
                                                 p=rng.randint(1, 80), y=rng.randint(1990, 2030),
                                                 h=rng.randint(0, 23), m=rng.randint(0, 59), k=rng.randint(1, 12)))
        elif kind < 0.73:
            gen.append(rng.choice(_MULTI))
        elif kind < 0.81:
            gen.append(rng.choice(_CODE))
        elif kind < 0.89:
            gen.append(rng.choice(_FRAGMENTS))
        else:
            parts = rng.sample(_LONG_TOPICS, rng.randint(1, 3))
            gen.append(" ".join(parts))
        if gen[-1] in out or gen[-1] in gen[:-1]:
            gen.pop()  # no duplicates: nearest-neighbour agreement needs distinct texts
    return out + gen
