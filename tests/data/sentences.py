"""A varied set of texts for end-to-end checks: 1 to 256 tokens, several languages, code, numbers, emoji."""

_LONG_A = (
    "Edge inference runtimes execute neural networks directly on the device that collects the data, "
    "which keeps private information local, removes the round trip to a server and keeps working "
    "without a network connection. The price is a tight budget of memory, power and compute, so "
    "engineers quantize weights, fuse operators, remove padding from batches and choose kernels that "
    "suit the processor's vector units. "
)
_LONG_B = (
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon; the lunar module Eagle touched "
    "down in the Sea of Tranquility while Michael Collins orbited above in the command module. "
)

SENTENCES = [
    "ok",
    "Hello!",
    "a",
    "?",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "How do I reset my password if I no longer have access to my email account?",
    "What is the capital of Australia? Many people guess Sydney, but it is Canberra.",
    "The stock fell 3.7% to $142.55 on Tuesday after the Q3 earnings call.",
    "Call me at +1 (555) 010-9999 or write to jane.doe@example.com before 5 pm.",
    "See https://example.org/docs/v2/install?lang=en#linux for the full guide.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days' ORDER BY name;",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "<div class=\"card\"><h2>Title</h2><p>Body text</p></div>",
    "Le chat est assis sur le tapis et regarde la pluie tomber.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El tren de alta velocidad conecta Madrid con Barcelona en menos de tres horas.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "Москва — столица России.",
    "I love this so much 😍🔥🔥 #blessed",
    "!!! ??? ... ,,, ;;;",
    "the the the the the the the the the the the the the the the the",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "UPPERCASE LETTERS SHOULD BE LOWERCASED BY THE TOKENIZER",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "She sells sea shells by the sea shore.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "Quantum computers use qubits, which can be in superpositions of 0 and 1.",
    "Please turn off the lights when you leave the room.",
    "It was the best of times, it was the worst of times.",
    "To be, or not to be, that is the question.",
    "Machine learning models can overfit when the training set is small.",
    "The recipe calls for 200 g flour, 2 eggs, 100 ml milk and a pinch of salt.",
    "Error: segmentation fault (core dumped) at 0x7ffd5e8a3b10",
    "Traffic on the A4 motorway is backed up for 12 km after an accident near exit 23.",
    "Can you recommend a good book about the history of mathematics?",
    "Il pleut des cordes depuis ce matin, alors nous restons à la maison.",
    "Running late, see you in 10 min",
    "Thanks!",
    _LONG_B * 2,
    _LONG_A * 2,
    _LONG_A * 5,  # truncated at 256 tokens
    (_LONG_B + _LONG_A) * 4,  # truncated at 256 tokens
]
