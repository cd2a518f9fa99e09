"""
Generate small synthetic fine-tuning data sets for the MuxTune examples.

    python examples/make_data.py [--out examples/data] [--seed 0] [--scale 1.0]

Writes four JSONL files (one JSON object per line, ASCII only):

    sentiment.jsonl      ~400 x {"prompt", "completion"}  short   (~40-120 char prompts)
    qa.jsonl             ~300 x {"prompt", "completion"}  medium  (150-400 char prompts)
    summarization.jsonl  ~150 x {"prompt", "completion"}  long    (600-1800 char prompts)
    chat.jsonl           ~250 x {"messages"}              long-tailed (80-3000 chars), chat format

Why the lengths differ: MuxTune packs many tenants' jobs onto one backbone, and
the interesting scheduling/batching behaviour only shows up when tenants bring
sequences of very different lengths -- a classifier tenant with tiny prompts
next to a summariser with long ones next to a chat tenant whose lengths are
mostly short but occasionally huge. These files reproduce that mix cheaply.

The labels are not noise: sentiment follows word lists, QA answers and
summaries are copied from facts stated in the prompt, so a model can actually
learn each task and losses should go down.

Everything is deterministic given --seed (each file gets its own
random.Random instance; the global RNG is never touched). --scale multiplies
the line counts so a benchmark can make bigger files.
"""

import argparse
import json
import random
from pathlib import Path

# -----------------------------------------------------------------------------
# vocabulary shared by the generators

NAMES = ["Aldric", "Brenna", "Corvin", "Dalia", "Evander", "Fenna", "Garrick", "Hollis",
         "Isolde", "Jorund", "Kestra", "Lorcan", "Maelis", "Nerys", "Orrin", "Perrin",
         "Quilla", "Rowan", "Sabine", "Tamsin", "Ulric", "Vesna", "Wystan", "Yara", "Zorvik"]
CITIES = ["Port Amber", "Greywater", "Lindholm", "Marrowfield", "Oakhaven", "Redcliff",
          "Saltmere", "Thornbury", "Velmora", "Westcombe", "Ironhollow", "Duskvale"]
JOBS = ["baker", "carpenter", "cartographer", "chemist", "fisher", "glassblower",
        "librarian", "mason", "nurse", "pilot", "potter", "tailor", "teacher", "weaver"]
COLORS = ["amber", "crimson", "indigo", "olive", "scarlet", "silver", "teal", "violet"]
PETS = ["cat", "dog", "ferret", "goat", "hedgehog", "parrot", "rabbit", "tortoise"]
ORGS = ["the Velmora Guild of Engineers", "the Oakhaven Rowing Club", "the Saltmere Trust",
        "the Redcliff Astronomy Society", "the Greywater Council", "Lindholm University",
        "the Thornbury Chess League", "the Duskvale Farmers Union", "Marrowfield Hospital"]
EVENTS = ["festival", "conference", "charity race", "science fair", "market",
          "chess tournament", "harvest fair", "public lecture", "concert", "regatta"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def pick(rng, xs):
    return xs[rng.randrange(len(xs))]


def until(rng, make, ok):
    # rejection sampling keeps the templates simple while still guaranteeing
    # the documented length ranges; it stays deterministic because rng is seeded
    while True:
        x = make(rng)
        if ok(x):
            return x


# -----------------------------------------------------------------------------
# 1. sentiment: short prompts, one-word label decided by the word lists

POS = ["delicious", "friendly", "wonderful", "fresh", "lovely", "excellent", "quick", "cozy"]
NEG = ["cold", "rude", "awful", "stale", "slow", "dirty", "bland", "noisy"]
NEU = ["ordinary", "average", "plain", "typical", "standard", "fine"]
THINGS = ["soup", "staff", "bread", "room", "service", "coffee", "music", "pasta", "waiter", "view"]


def sentiment_example(rng):
    k = rng.choice([1, 2, 2, 3])
    parts = [f"the {pick(rng, THINGS)} was {pick(rng, pick(rng, [POS, NEG, NEU]))}" for _ in range(k)]
    review = ", ".join(parts[:-1]) + (" and " if k > 1 else "") + parts[-1] + "."
    words = review.rstrip(".").replace(",", "").split()
    # label = which polarity has more words; ties (incl. all neutral) are neutral
    score = sum(w in POS for w in words) - sum(w in NEG for w in words)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return {"prompt": f"Review: {review}\nSentiment:", "completion": f" {label}"}


def make_sentiment(rng, n):
    ok = lambda ex: 40 <= len(ex["prompt"]) <= 120
    return [until(rng, sentiment_example, ok) for _ in range(n)]


# -----------------------------------------------------------------------------
# 2. qa: a context paragraph about a few fictional people, then one question

QUESTIONS = {
    "city": ("Where does {n} live?", "{n} lives in {v}."),
    "job": ("What is {n}'s job?", "{n} is a {v}."),
    "color": ("What is {n}'s favourite colour?", "{n}'s favourite colour is {v}."),
    "pet": ("What pet does {n} keep?", "{n} keeps a {v}."),
    "age": ("How old is {n}?", "{n} is {v} years old."),
}


def person(rng, name):
    return {"name": name, "city": pick(rng, CITIES), "job": pick(rng, JOBS),
            "color": pick(rng, COLORS), "pet": pick(rng, PETS), "age": str(rng.randint(19, 87))}


def describe(p):
    n = p["name"]
    return (f"{n} is a {p['age']}-year-old {p['job']} who lives in {p['city']}. "
            f"{n} keeps a {p['pet']} and likes the colour {p['color']}.")


def qa_example(rng):
    # distinct names so every question has exactly one correct answer
    people = [person(rng, n) for n in rng.sample(NAMES, rng.randint(1, 4))]
    p, attr = pick(rng, people), pick(rng, sorted(QUESTIONS))
    q, a = QUESTIONS[attr]
    context = " ".join(describe(x) for x in people)
    return {"prompt": f"Context: {context}\nQuestion: {q.format(n=p['name'])}\nAnswer:",
            "completion": " " + a.format(n=p["name"], v=p[attr])}


def make_qa(rng, n):
    ok = lambda ex: 150 <= len(ex["prompt"]) <= 400 and 10 <= len(ex["completion"]) <= 60
    return [until(rng, qa_example, ok) for _ in range(n)]


# -----------------------------------------------------------------------------
# 3. summarization: a long article padded with filler; the summary keeps only
#    the key facts (who, what, where, how many), so the model must find them

FILLER = [
    "The weather stayed {w} for most of the day.",
    "Local shops reported {w} business throughout the afternoon.",
    "{p}, a {j} from {c}, said the atmosphere was {w}.",
    "Volunteers from {c} helped set up the stalls early in the morning.",
    "Several visitors travelled from {c} to take part.",
    "A brass band played near the main entrance while people queued.",
    "{p} told reporters that the preparations had taken several months.",
    "Organisers thanked the {j}s of {c} for lending equipment.",
    "Parking near the venue was {w}, according to residents.",
    "The previous edition had been held in {c} two years earlier.",
    "Food was provided by a {j} who has lived in {c} for decades.",
    "Children were offered free entry to the afternoon sessions.",
    "{p} described the event as {w} but worth the effort.",
    "A small exhibition about the history of {c} drew steady crowds.",
]
MOODS = ["calm", "busy", "lively", "quiet", "pleasant", "chaotic", "cheerful", "crowded"]


def filler(rng):
    return pick(rng, FILLER).format(w=pick(rng, MOODS), p=pick(rng, NAMES),
                                    j=pick(rng, JOBS), c=pick(rng, CITIES))


def summarization_example(rng):
    org, event, city = pick(rng, ORGS), pick(rng, EVENTS), pick(rng, CITIES)
    day, lead, count = pick(rng, DAYS), pick(rng, NAMES), rng.randint(40, 9000)
    key = [f"On {day}, {org} held a {event} in {city}.",
           f"Organisers said {count} people attended.",
           f"The event was led by {lead}, who opened it with a short speech."]
    body = [filler(rng) for _ in range(rng.randint(6, 26))]
    # scatter the key facts among the filler so position is not a shortcut
    for s in key[1:]:
        body.insert(rng.randint(0, len(body)), s)
    article = " ".join([key[0]] + body)
    summary = f" {org[0].upper() + org[1:]} held a {event} in {city}, led by {lead}, with {count} people attending."
    return {"prompt": f"Article: {article}\nSummary:", "completion": summary}


def make_summarization(rng, n):
    ok = lambda ex: 600 <= len(ex["prompt"]) <= 1800 and 60 <= len(ex["completion"]) <= 200
    return [until(rng, summarization_example, ok) for _ in range(n)]


# -----------------------------------------------------------------------------
# 4. chat: transcripts whose turn count and reply length are long-tailed, so
#    most rows are short and a few are very long, like real chat logs

TOPICS = ["bread", "sailing", "chess", "gardening", "maps", "glass", "weaving", "stars", "pottery"]
ASKS = ["How do I get started with {t}?", "What is the hardest part of {t}?",
        "Can you give me a tip about {t}?", "Why do people enjoy {t}?",
        "What tools do I need for {t}?", "Is {t} expensive?"]
REPLIES = ["Start small and practise {t} a little every day.",
           "Most beginners find that patience matters more than talent in {t}.",
           "A good teacher from {c} can save you months of mistakes.",
           "Keep notes on what worked, because {t} rewards careful habits.",
           "You do not need expensive tools at first.",
           "Many people in {c} meet weekly to share ideas about {t}.",
           "Try one new technique at a time so you can see what changed.",
           "Mistakes are normal and usually teach you the most.",
           "Read a little about the history of {t}; it explains a lot of the rules.",
           "If you feel stuck, take a break and come back with fresh eyes."]
FOLLOWUPS = ["Thanks! And what about {t}?", "That helps. Anything else?", "Can you explain more?",
             "OK. What should I avoid?", "Interesting, tell me more.", "Got it."]


def geometric(rng, p, lo, hi):
    # P(k) ~ (1-p)^k: the long tail that makes a few transcripts much longer
    k = lo
    while k < hi and rng.random() > p:
        k += 1
    return k


def reply(rng, topic):
    n = geometric(rng, 0.3, 1, 16)
    return " ".join(pick(rng, REPLIES).format(t=topic, c=pick(rng, CITIES)) for _ in range(n))


def chat_example(rng):
    topic = pick(rng, TOPICS)
    # the {"messages": [{"role", "content"}]} format fine-tuning APIs accept; loss on assistant turns
    messages = [{"role": "system", "content": "You are a helpful hobby coach."}] if rng.random() < 0.3 else []
    for i in range(geometric(rng, 0.4, 1, 8)):
        ask = pick(rng, ASKS) if i == 0 else pick(rng, FOLLOWUPS)
        messages += [{"role": "user", "content": ask.format(t=topic)},
                     {"role": "assistant", "content": reply(rng, topic)}]
        topic = pick(rng, TOPICS) if rng.random() < 0.3 else topic
    return {"messages": messages}


def make_chat(rng, n):
    ok = lambda ex: 80 <= size(ex) <= 3000
    return [until(rng, chat_example, ok) for _ in range(n)]


# -----------------------------------------------------------------------------

TASKS = [  # (file, base line count, generator)
    ("sentiment.jsonl", 400, make_sentiment),
    ("qa.jsonl", 300, make_qa),
    ("summarization.jsonl", 150, make_summarization),
    ("chat.jsonl", 250, make_chat),
]


def size(ex):
    if "messages" in ex:
        return sum(len(m["content"]) for m in ex["messages"])
    return len(ex["text"]) if "text" in ex else len(ex["prompt"]) + len(ex["completion"])


def write(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, base, make) in enumerate(TASKS):
        # one RNG per file so changing one generator leaves the others' output intact
        rng = random.Random(args.seed * 1000 + i)
        rows = make(rng, max(1, round(base * args.scale)))
        write(out / name, rows)
        s = sorted(size(r) for r in rows)
        print(f"{name:20s} lines={len(rows):5d} chars min={s[0]} median={s[len(s) // 2]} max={s[-1]}")


if __name__ == "__main__":
    main()
