"""The texts of the demo corpus, source by source, plus spoken questions and instructions.

- ``templates``: sentences from templates and word lists written by us (this module).
- ``backbone``: sentences the backbone (SmolLM2) writes about topics listed here, sampled once with a
  fixed seed (`speechlm.demo.corpus` caches them).
- ``words``: sentences the backbone writes with each of the common English words (wordfreq's frequency
  list, `common_words`) that the other training texts speak too rarely, so that the language's common
  words are each heard several times.
- ``stdlib``: sentences cut from the docstrings of the Python standard library's source files: plain
  technical prose, the vocabulary of software documentation from a source other than ``docs``. The
  quick start's corpus leaves it out (at 15 minutes of training it costs more than it gives, BENCHMARKS.md).
- ``docs``: sentences cut from the package descriptions (README text) that ship in the metadata of
  installed packages, cleaned to plain, speakable prose. The out-of-domain split uses this source only.
- ``questions``: spoken questions and instructions of many kinds, written by us; some have known short
  answers (for accuracy), all get the backbone's own answer to the same text as their training target.

Everything here is deterministic given a seed; nothing is downloaded.
"""

from __future__ import annotations

import ast
import importlib.metadata
import platform
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# -- our templates ---------------------------------------------------------------------------------------
NAMES = ("Anna", "Marcus", "Priya", "Tom", "Elena", "David", "Grace", "Omar", "Lucy", "Victor", "Hannah",
         "Samuel", "Mei", "Jonas", "Clara", "Peter", "Aisha", "Leo", "Nora", "Felix")
OBJECTS = ("umbrella", "notebook", "backpack", "lamp", "bicycle", "kettle", "scarf", "camera", "guitar",
           "basket", "mirror", "ladder", "blanket", "wallet", "clock", "bottle", "jacket", "pencil")
PLACES = ("kitchen", "garden", "office", "garage", "library", "hallway", "attic", "station", "bakery",
          "museum", "park", "harbor", "classroom", "market", "cellar", "balcony")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "brown", "silver", "white", "black")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "March", "April", "June", "August", "October", "November", "December")
TIMES = ("seven in the morning", "half past eight", "noon", "a quarter to three", "five o'clock",
         "six thirty", "nine at night", "ten past eleven")
CITIES = ("Paris", "Chicago", "Lisbon", "Toronto", "Madrid", "Boston", "Vienna", "Dublin", "Seattle",
          "Oslo", "Denver", "Prague")
ANIMALS = ("cat", "dog", "horse", "rabbit", "owl", "fox", "goat", "duck", "turtle", "squirrel")
FOODS = ("apples", "lemons", "carrots", "potatoes", "onions", "peaches", "tomatoes", "cookies")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve")
ADJECTIVES = ("quiet", "sleepy", "curious", "happy", "nervous", "calm", "busy", "tired")
CHORES = ("water the plants", "call the dentist", "buy fresh bread", "pay the rent", "feed the cat",
          "return the library books", "clean the windows", "send the invitations")
DEVICES = ("lights", "heater", "fan", "radio", "television", "oven")
WEATHER = ("sunny", "rainy", "windy", "cloudy", "foggy", "snowy")

TEMPLATES = (
    "{name} left the {color} {object} in the {place} on {day}.",
    "Please remind me to {chore} at {time} on {day}.",
    "The {animal} near the {place} looked {adjective} this morning.",
    "Can you tell {name} that the meeting moved to {time}?",
    "I bought {number} {food} for {name} at the market on {day}.",
    "The weather in {city} will be {weather} on {day}.",
    "Turn off the {device} in the {place} before {name} comes home.",
    "{name} and {name2} are planning a trip to {city} in {month}.",
    "Our train to {city} leaves at {time} from platform {number}.",
    "Have you seen my {color} {object}? I think it is in the {place}.",
    "{name} walked the {animal} to the {place} every {day}.",
    "We need {number} more {food} for the soup that {name} makes on {day}.",
    "The {object} in the {place} is older than the house.",
    "{name} painted the {place} door {color} last {month}.",
    "If it is {weather} in {city} tomorrow, we will stay inside.",
    "Set an alarm for {time} so {name} does not miss the bus.",
)
SLOTS = dict(name=NAMES, name2=NAMES, object=OBJECTS, place=PLACES, color=COLORS, day=DAYS, month=MONTHS,
             time=TIMES, city=CITIES, animal=ANIMALS, food=FOODS, number=NUMBERS, adjective=ADJECTIVES,
             chore=CHORES, device=DEVICES, weather=WEATHER)


def template_sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences from `TEMPLATES` (a random template each, so none runs dry)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(sentences) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"the templates cannot make {count} distinct sentences; ask for fewer")
        template = rng.choice(TEMPLATES)
        values = {slot: rng.choice(words) for slot, words in SLOTS.items()}
        while values["name2"] == values["name"]:
            values["name2"] = rng.choice(NAMES)
        sentence = template.format(**values)
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


# -- topics the backbone writes about --------------------------------------------------------------------
TOPICS = ("the ocean", "a rainy afternoon", "baking bread", "a mountain hike", "a city at night",
          "learning to swim", "an old library", "a thunderstorm", "growing tomatoes", "a train journey",
          "the first day of school", "a birthday party", "the moon", "a busy airport", "winter mornings",
          "a lost dog", "fixing a bicycle", "a quiet village", "the desert", "a football match",
          "a summer festival", "cooking soup", "a museum visit", "autumn leaves", "a farmers market",
          "a long drive", "a snowy forest", "a science fair", "the night sky", "a fishing trip",
          "painting a room", "a music lesson", "a picnic in the park", "the river", "a small bakery",
          "a camping trip", "a job interview", "the beach in winter", "a chess game", "a garden in spring",
          "recycling", "a family dinner", "a power outage", "a crowded bus", "writing a letter",
          "a lighthouse", "a rainy commute", "planting trees", "a coffee shop", "an empty theater")
SENTENCE_PROMPT = "Write one short, simple sentence about {topic}. Reply with the sentence only."


# -- the common words of English -------------------------------------------------------------------------
WORD_PROMPT = 'Write one short, simple sentence that uses the word "{word}". Reply with the sentence only.'
_COMMON_WORD = re.compile(r"[a-z]{3,}")  # a word of three letters or more: wordfreq's list also holds
# letters and abbreviations ("x", "tv", "uk") that no one asks for a sentence with


def common_words(count: int) -> list[str]:
    """The ``count`` most frequent English words of three letters or more, by wordfreq's frequency list (a
    well-kept list from many corpora, so that the choice is not ours)."""
    from wordfreq import top_n_list

    words = [word for word in top_n_list("en", 4 * count + 100) if _COMMON_WORD.fullmatch(word)]
    if len(words) < count:
        raise ValueError(f"wordfreq lists only {len(words)} English words of three letters or more; "
                         f"asked for {count}")
    return words[:count]


def spoken_words(text: str) -> list[str]:
    """The words of a text as a listener counts them: lower case, numbers kept, apostrophes inside words."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


# -- spoken questions and instructions -------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """A spoken prompt; ``expected`` lists acceptable short answers where one is known."""

    kind: str
    text: str
    expected: tuple[str, ...] = field(default=())


CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid",
            "England": "London", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
            "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "China": "Beijing", "Austria": "Vienna",
            "Poland": "Warsaw", "Sweden": "Stockholm", "Denmark": "Copenhagen", "Finland": "Helsinki",
            "Belgium": "Brussels", "Hungary": "Budapest", "Thailand": "Bangkok", "Kenya": "Nairobi",
            "Peru": "Lima", "Cuba": "Havana", "South Korea": "Seoul", "Australia": "Canberra",
            "the United States": "Washington", "Scotland": "Edinburgh", "Iceland": "Reykjavik"}
COLOR_OF = {"a banana": "yellow", "grass": "green", "the sky on a clear day": "blue", "snow": "white",
            "coal": "black", "a ripe tomato": "red", "a carrot": "orange", "milk": "white",
            "a lemon": "yellow", "a lime": "green", "chocolate": "brown", "a strawberry": "red",
            "a fire truck": "red", "a crow": "black", "a polar bear": "white", "a pumpkin": "orange",
            "a frog": "green", "blood": "red"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "open": "closed",
             "light": "dark", "early": "late", "wet": "dry", "full": "empty", "old": "young", "loud": "quiet",
             "hard": "soft", "day": "night", "left": "right", "win": "lose", "north": "south", "good": "bad",
             "tall": "short", "rich": "poor", "clean": "dirty", "strong": "weak", "thick": "thin",
             "inside": "outside", "push": "pull", "before": "after", "first": "last", "love": "hate"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
FACTS = (("How many days are in a week?", ("seven", "7")), ("How many legs does a dog have?", ("four", "4")),
         ("How many months are in a year?", ("twelve", "12")), ("What do bees make?", ("honey",)),
         ("What is frozen water called?", ("ice",)), ("Which planet do we live on?", ("earth",)),
         ("What animal says moo?", ("cow",)), ("How many hours are in a day?", ("24", "twenty-four")),
         ("What is the largest ocean on Earth?", ("pacific",)), ("What gas do plants take in?", ("carbon",)),
         ("What do you call a baby cat?", ("kitten",)), ("How many sides does a triangle have?", ("three", "3")),
         ("What animal says woof?", ("dog",)), ("What animal says meow?", ("cat",)),
         ("How many wheels does a bicycle have?", ("two", "2")), ("How many legs does a spider have?", ("eight", "8")),
         ("What is the largest planet in our solar system?", ("jupiter",)),
         ("Who wrote Romeo and Juliet?", ("shakespeare",)), ("How many minutes are in an hour?", ("sixty", "60")),
         ("What is the closest star to Earth?", ("sun",)), ("What do caterpillars turn into?", ("butterfly",
                                                                                                 "butterflies")),
         ("What do you call a baby dog?", ("puppy",)), ("Which animal is called the king of the jungle?", ("lion",)),
         ("What is the largest animal on Earth?", ("whale",)), ("What season comes after winter?", ("spring",)),
         ("What day comes after Monday?", ("tuesday",)), ("What month comes after January?", ("february",)),
         ("Which planet is known as the red planet?", ("mars",)), ("What language do people speak in Brazil?",
                                                                   ("portuguese",)),
         ("Which instrument has black and white keys?", ("piano",)), ("Where do bees live?", ("hive", "hives")),
         ("What fruit are raisins made from?", ("grape", "grapes")), ("What do plants need from the sun?",
                                                                      ("light", "sunlight")),
         ("What is the opposite of the word yes?", ("no",)), ("How many letters are in the English alphabet?",
                                                              ("26", "twenty-six")))
CATEGORIES = ("fruits", "vegetables", "farm animals", "colors", "musical instruments", "countries in Europe",
              "kitchen tools", "sports", "things you wear in winter", "pets")
REQUESTS = ("Give me a synonym for {word}.", "Use the word {word} in a sentence.",
            "Explain what {word} means in one sentence.")
REQUEST_WORDS = ("brave", "tiny", "gentle", "ancient", "bright", "clever", "rapid", "calm", "generous", "fragile")
ADVICE = ("How can I sleep better?", "How do I make a cup of tea?", "What should I pack for a beach trip?",
          "How can I save money on groceries?", "What is a good way to learn new words?",
          "How do I keep a plant alive indoors?", "What should I do if I feel bored?",
          "How can I be on time more often?")
# Held out of training entirely: the out-of-domain split asks these kinds only.
OOD_QUESTION_KINDS = ("yes_no", "compare")
YES_NO = (("Is the sun hot?", "yes"), ("Is ice hot?", "no"), ("Can fish swim?", "yes"), ("Can a cat fly?", "no"),
          ("Is the ocean salty?", "yes"), ("Do trees have leaves?", "yes"), ("Is a mouse bigger than a horse?", "no"),
          ("Is water wet?", "yes"), ("Do birds have feathers?", "yes"), ("Is snow black?", "no"))
COMPARE = (("Which is bigger, an elephant or a mouse?", "elephant"), ("Which is colder, ice or fire?", "ice"),
           ("Which is faster, a car or a bicycle?", "car"), ("Which is heavier, a rock or a feather?", "rock"),
           ("Which is taller, a tree or a flower?", "tree"), ("Which is longer, a year or a day?", "year"))


def all_questions() -> list[Question]:
    """Every spoken question and instruction we wrote, in a fixed order."""
    questions = [Question("capital", f"What is the capital of {country}?", (city,))
                 for country, city in CAPITALS.items()]
    questions += [Question("color", f"What color is {thing}?", (color,)) for thing, color in COLOR_OF.items()]
    questions += [Question("opposite", f"What is the opposite of {word}?", (other,))
                  for word, other in OPPOSITES.items()]
    # Few sums: SmolLM2-135M gets most of them wrong as text, so they say little about speech vs text.
    questions += [Question("arithmetic", f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?",
                           (str(a + b), NUMBER_WORDS[a + b]))
                  for a in range(1, 6) for b in range(1, 5)]
    questions += [Question("fact", text, expected) for text, expected in FACTS]
    questions += [Question("list", f"List three {category}.") for category in CATEGORIES]
    questions += [Question("word", request.format(word=word)) for request in REQUESTS for word in REQUEST_WORDS]
    questions += [Question("describe", f"Describe {topic} in one sentence.") for topic in TOPICS]
    questions += [Question("advice", text) for text in ADVICE]
    questions += [Question("object_use", f"What can you do with a {thing}?") for thing in OBJECTS]
    questions += [Question("animal_fact", f"Tell me one fact about the {animal}.") for animal in ANIMALS]
    questions += [Question("place", f"What do people do in a {place}?") for place in PLACES]
    questions += [Question("yes_no", text, (answer,)) for text, answer in YES_NO]
    questions += [Question("compare", text, (answer,)) for text, answer in COMPARE]
    return questions


# -- sentences from the Python standard library's docstrings ----------------------------------------------
# Parts of the standard library that are tests, tools or GUI demos rather than documented modules.
_STDLIB_SKIPPED = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                   "dist-packages", "pydoc_data", "this.py", "antigravity.py"}


def stdlib_sentences() -> tuple[list[str], str]:
    """Plain sentences from the docstrings (modules, classes, functions) of the standard library's source
    files, read with `ast` (nothing is imported), and the Python version they came from. The same
    filter as `doc_sentences` keeps only speakable prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sentences: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & _STDLIB_SKIPPED:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue  # a few files are templates or test data, not Python
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for sentence in _sentences(_plain_text(ast.get_docstring(node) or "")):
                    if sentence not in seen:
                        seen.add(sentence)
                        sentences.append(sentence)
    return sentences, platform.python_version()


# -- sentences from package documentation ----------------------------------------------------------------
# Packages that a demo install always has; their README text (package metadata) is the docs source.
DOC_PACKAGES = ("accelerate", "einops", "huggingface_hub", "numpy", "openai-whisper", "peft", "soundfile",
                "soxr", "tokenizers", "torch", "tqdm", "transformers")
_SPEAKABLE_WORD = re.compile(r"^[A-Za-z][a-z]*(?:['-][a-z]+)*[,;:]?$")


def doc_sentences(packages: tuple[str, ...] = DOC_PACKAGES) -> tuple[list[str], dict[str, str]]:
    """Plain sentences from the descriptions of installed ``packages`` and the versions they came from.

    Kept: 6 to 22 words, a capital first letter, a full stop at the end, and only words a voice can
    read (letters, apostrophes, hyphens; no code, numbers, paths or CamelCase names). Missing packages
    are skipped; the versions dict says which ones were read.
    """
    sentences: list[str] = []
    seen: set[str] = set()
    versions: dict[str, str] = {}
    for package in packages:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        versions[package] = distribution.version
        description = distribution.metadata.get_payload() or distribution.metadata.get("Description") or ""
        for sentence in _sentences(_plain_text(str(description))):
            if sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences, versions


def _plain_text(markup: str) -> str:
    """README markdown/reStructuredText -> prose: code, tables, links markup, HTML and URLs removed."""
    text = re.sub(r"```.*?```", " ", markup, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", text)  # images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [label](url) -> label
    text = re.sub(r"`([^`]*)`_?", r"\1", text)
    text = re.sub(r"https?://\S+", " ", text)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        # headings, tables, list markers, directives and indented code blocks carry no prose
        if (not stripped or line.startswith(("    ", "\t")) or stripped[0] in "#|=-*+>.:" or
                re.fullmatch(r"[\W_]+", stripped)):
            lines.append("")
            continue
        lines.append(stripped)
    return "\n".join(lines)


def _sentences(text: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = re.sub(r"\s+", " ", paragraph).strip()
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = sentence.split()
            if not 6 <= len(words) <= 22 or not sentence.endswith(".") or not sentence[0].isupper():
                continue
            body = words[:-1] + [words[-1][:-1]]
            if all(_SPEAKABLE_WORD.match(word) for word in body if word):
                out.append(sentence)
    return out
