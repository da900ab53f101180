"""Data about countries and general knowledge, shared by the recipes, the evaluation and the benches.

Pure data and small pure functions; nothing is read or computed at import.

- ``COUNTRIES``: capitals (with aliases), languages, continents and currencies of well-known
  countries; ``KNOWN_COUNTRIES``: the ones each packaged model answers (measured). The capital demo's
  facts file (``cmc_edge/data/capitals.jsonl``, run through ``cmc-edge forget``) is built from these;
  the JSON recipe asks its questions about them (``TRAIN_CAPITAL_FORMS`` and the attribute forms for
  training, the ``HELDOUT_`` forms for its check).
- ``UNRELATED_QUESTIONS``: general knowledge never used in training (the forget recipe's test split).
- ``BROAD_PROMPTS``: open-ended prompts whose template answers become KL targets (retain data).
- ``GENERAL_TEXT``: prose for perplexity.

>>> render("{C}'s capital city is called what?", "the Philippines")
"The Philippines's capital city is called what?"
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cmc_edge.errors import InputError
from cmc_edge.eval.scoring import answer_recalled

Split = Literal["forget", "retain", "unrelated"]


@dataclass(frozen=True)
class Country:
    """A country and the accepted answers for each fact; the first alias is the canonical answer.

    An empty tuple means "not asked" (the fact is ambiguous or its answer repeats the country name).
    """

    name: str
    capital: tuple[str, ...]
    language: tuple[str, ...]
    continent: tuple[str, ...]
    currency: tuple[str, ...]

    def __post_init__(self):
        if not self.capital:
            raise ValueError(f"{self.name}: a capital is required")


_EU, _AS, _AF = ("Europe",), ("Asia",), ("Africa",)
_NA, _SA = ("North America",), ("South America",)
_EURASIA = ("Europe", "Asia", "Eurasia")
_EURO = ("euro", "euros", "EUR")

# Well-known countries only: a 135M model knows few capitals. Excluded on purpose: countries whose
# capital shares their name (Mexico is kept: "Mexico City" is a two-word phrase), countries with
# several capitals or a disputed one (Netherlands, South Africa, Bolivia, Israel), and microstates.
COUNTRIES: tuple[Country, ...] = (
    Country("France", ("Paris",), ("French",), _EU, _EURO),
    Country("Germany", ("Berlin",), ("German",), _EU, _EURO),
    Country("Italy", ("Rome", "Roma"), ("Italian",), _EU, _EURO),
    Country("Spain", ("Madrid",), ("Spanish", "Castilian"), _EU, _EURO),
    Country("Portugal", ("Lisbon", "Lisboa"), ("Portuguese",), _EU, _EURO),
    Country("the United Kingdom", ("London",), ("English",), _EU,
            ("pound sterling", "pound", "pounds", "sterling", "GBP")),
    Country("Ireland", ("Dublin",), ("English", "Irish", "Gaelic"), _EU, _EURO),
    Country("Russia", ("Moscow",), ("Russian",), _EURASIA, ("ruble", "rubles", "rouble", "roubles")),
    Country("China", ("Beijing", "Peking"), ("Chinese", "Mandarin"), _AS,
            ("yuan", "renminbi", "RMB", "CNY")),
    Country("Japan", ("Tokyo",), ("Japanese",), _AS, ("yen", "JPY")),
    Country("India", ("New Delhi", "Delhi"), ("Hindi", "English"), _AS, ("rupee", "rupees", "INR")),
    Country("the United States", ("Washington, D.C.", "Washington"), ("English",), _NA,
            ("US dollar", "dollar", "dollars", "USD")),
    Country("Canada", ("Ottawa",), ("English", "French"), _NA, ("Canadian dollar", "dollar", "dollars")),
    Country("Mexico", ("Mexico City",), ("Spanish",), _NA, ("peso", "pesos")),
    Country("Brazil", ("Brasília", "Brasilia"), ("Portuguese",), _SA, ("real", "reais", "BRL")),
    Country("Argentina", ("Buenos Aires",), ("Spanish",), _SA, ("peso", "pesos")),
    Country("Chile", ("Santiago",), ("Spanish",), _SA, ("peso", "pesos")),
    Country("Peru", ("Lima",), ("Spanish", "Quechua"), _SA, ("sol", "soles", "nuevo sol")),
    Country("Colombia", ("Bogotá", "Bogota"), ("Spanish",), _SA, ("peso", "pesos")),
    Country("Venezuela", ("Caracas",), ("Spanish",), _SA, ("bolívar", "bolivar", "bolivares")),
    Country("Uruguay", ("Montevideo",), ("Spanish",), _SA, ("peso", "pesos")),
    Country("Ecuador", ("Quito",), ("Spanish",), _SA, ("US dollar", "dollar", "dollars")),
    Country("Cuba", ("Havana", "La Habana"), ("Spanish",), (), ("peso", "pesos")),
    Country("Jamaica", ("Kingston",), ("English",), (), ("Jamaican dollar", "dollar", "dollars")),
    Country("Egypt", ("Cairo",), ("Arabic",), _AF, ("Egyptian pound", "pound", "pounds")),
    Country("Kenya", ("Nairobi",), ("Swahili", "English"), _AF, ("shilling", "shillings")),
    Country("Nigeria", ("Abuja",), ("English",), _AF, ("naira",)),
    Country("Ethiopia", ("Addis Ababa",), ("Amharic",), _AF, ("birr",)),
    Country("Morocco", ("Rabat",), ("Arabic", "Berber", "Tamazight"), _AF, ("dirham", "dirhams")),
    Country("Ghana", ("Accra",), ("English",), _AF, ("cedi", "cedis")),
    Country("Australia", ("Canberra",), ("English",), ("Oceania",), ("Australian dollar", "dollar", "dollars")),
    Country("New Zealand", ("Wellington",), ("English", "Maori"), ("Oceania",),
            ("New Zealand dollar", "dollar", "dollars")),
    Country("Greece", ("Athens",), ("Greek",), _EU, _EURO),
    Country("Turkey", ("Ankara",), ("Turkish",), _EURASIA, ("lira", "Turkish lira")),
    Country("Poland", ("Warsaw",), ("Polish",), _EU, ("złoty", "zloty")),
    Country("Sweden", ("Stockholm",), ("Swedish",), _EU, ("krona", "kronor")),
    Country("Norway", ("Oslo",), ("Norwegian",), _EU, ("krone", "kroner")),
    Country("Denmark", ("Copenhagen",), ("Danish",), _EU, ("krone", "kroner")),
    Country("Finland", ("Helsinki",), ("Finnish", "Swedish"), _EU, _EURO),
    Country("Iceland", ("Reykjavík", "Reykjavik"), ("Icelandic",), _EU, ("króna", "krona")),
    Country("Austria", ("Vienna", "Wien"), ("German",), _EU, _EURO),
    Country("Switzerland", ("Bern", "Berne"), ("German", "French", "Italian", "Romansh"), _EU,
            ("Swiss franc", "franc", "francs", "CHF")),
    Country("Belgium", ("Brussels",), ("Dutch", "French", "German", "Flemish"), _EU, _EURO),
    Country("Hungary", ("Budapest",), ("Hungarian", "Magyar"), _EU, ("forint",)),
    Country("the Czech Republic", ("Prague", "Praha"), ("Czech",), _EU, ("koruna", "crown", "crowns")),
    Country("Romania", ("Bucharest",), ("Romanian",), _EU, ("leu", "lei")),
    # Croatia adopted the euro in 2023 and Bulgaria in 2026; models trained earlier name the old currency.
    Country("Croatia", ("Zagreb",), ("Croatian",), _EU, _EURO + ("kuna",)),
    Country("Bulgaria", ("Sofia",), ("Bulgarian",), _EU, _EURO + ("lev", "leva")),
    Country("Serbia", ("Belgrade", "Beograd"), ("Serbian",), _EU, ("dinar", "dinars")),
    Country("Ukraine", ("Kyiv", "Kiev"), ("Ukrainian",), _EU, ("hryvnia", "hryvnya")),
    Country("Iran", ("Tehran", "Teheran"), ("Persian", "Farsi"), _AS, ("rial", "rials")),
    Country("Iraq", ("Baghdad",), ("Arabic", "Kurdish"), _AS, ("dinar", "dinars")),
    Country("Saudi Arabia", ("Riyadh",), ("Arabic",), _AS, ("riyal", "riyals")),
    Country("Pakistan", ("Islamabad",), ("Urdu", "English"), _AS, ("rupee", "rupees")),
    Country("Afghanistan", ("Kabul",), ("Pashto", "Dari", "Persian"), _AS, ("afghani",)),
    Country("Thailand", ("Bangkok",), ("Thai",), _AS, ("baht",)),
    Country("Vietnam", ("Hanoi",), ("Vietnamese",), _AS, ("dong", "đồng")),
    Country("Indonesia", ("Jakarta",), ("Indonesian", "Bahasa Indonesia"), _AS, ("rupiah",)),
    Country("the Philippines", ("Manila",), ("Filipino", "Tagalog", "English"), _AS, ("peso", "pesos")),
    Country("South Korea", ("Seoul",), ("Korean",), _AS, ("won",)),
    Country("Bangladesh", ("Dhaka", "Dacca"), ("Bengali", "Bangla"), _AS, ("taka",)),
    Country("Nepal", ("Kathmandu",), ("Nepali", "Nepalese"), _AS, ("rupee", "rupees")),
    Country("Malaysia", ("Kuala Lumpur",), ("Malay", "Bahasa Malaysia"), _AS, ("ringgit",)),
)

ATTRIBUTES = ("language", "continent", "currency")


def country_by_name(name: str) -> Country:
    for c in COUNTRIES:
        if c.name == name:
            return c
    raise InputError(f"unknown country {name!r}", fix="use a name from cmc_edge.eval.demo_data.COUNTRIES")


# --- capital questions --------------------------------------------------------------------------

TRAIN_CAPITAL_FORMS: tuple[str, ...] = (
    "What is the capital of {c}?",
    "What is the capital city of {c}?",
    "Name the capital of {c}.",
    "Tell me the capital of {c}.",
    "Which city is the capital of {c}?",
    "What city is {c}'s capital?",
    "Do you know the capital of {c}?",
    "Capital of {c}?",
    "I am writing a report on {c}. What is its capital?",
    "Where is the capital of {c}? Give the city.",
)

# Paraphrases never used in training: the filter must generalise past the training wording.
HELDOUT_CAPITAL_FORMS: tuple[str, ...] = (
    "Which city serves as the seat of government of {c}?",
    "{C}'s capital city is called what?",
    "If I fly to the capital of {c}, which city do I land in?",
)


def render(form: str, country: str) -> str:
    """Fill a question form; ``{C}`` is the country name with its first letter capitalised."""
    return form.format(c=country, C=country[:1].upper() + country[1:])


# --- other facts about the same countries -------------------------------------------------------

# Training prompts of the JSON recipe (other questions about the same countries).
TRAIN_ATTRIBUTE_FORMS: dict[str, tuple[str, ...]] = {
    "language": (
        "What language is spoken in {c}?",
        "What is the official language of {c}?",
    ),
}

# Check only: continent and currency are never trained; language is asked in a new form.
HELDOUT_ATTRIBUTE_FORMS: dict[str, tuple[str, ...]] = {
    "language": ("Which language do most people in {c} speak?",),
    "continent": ("On which continent is {c} located?",),
    "currency": ("What currency is used in {c}?",),
}


# Open questions about a country (the JSON recipe trains on the prompts). None asks for a
# continent, currency or language, which are checked.
TRAIN_TOPIC_FORMS: tuple[tuple[str, str], ...] = (
    ("Tell me something interesting about {c}.", "{C} has a long history and a rich culture."),
    ("What food is {c} known for?", "{C} has its own traditional dishes, loved by locals and visitors."),
    ("Describe the landscape of {c}.", "{C} has a varied landscape of cities, countryside and natural sights."),
    ("What sports are popular in {c}?", "Many sports are popular in {c}, and football draws big crowds."),
)


# --- general knowledge never used in training ---------------------------------------------------

# (question, accepted answers, topic). No answer is a capital city, but some name a country that
# may be forgotten or share a word with a capital (George Washington): a filter that bans words
# instead of the fact shows up here. Probed on both models (date and settings at
# KNOWN_COUNTRIES): the 15 of 64 candidates that neither model answered were dropped; each model
# answers 35 of the remaining 49 (71%), with different misses.
UNRELATED_QUESTIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("What gas do plants take in from the air to make their food?", ("carbon dioxide", "CO2"), "science"),
    ("What is the largest planet in our solar system?", ("Jupiter",), "science"),
    ("What is the chemical formula of water?", ("H2O",), "science"),
    ("What is the chemical symbol for gold?", ("Au",), "science"),
    ("At what temperature in degrees Celsius does water boil at sea level?", ("100",), "science"),
    ("What force pulls objects toward the ground?", ("gravity", "gravitational"), "science"),
    ("What organ pumps blood around the human body?", ("heart",), "science"),
    ("What is 12 plus 15?", ("27", "twenty-seven"), "arithmetic"),
    ("What is 100 divided by 4?", ("25", "twenty-five"), "arithmetic"),
    ("How many sides does a triangle have?", ("3", "three"), "arithmetic"),
    ("How many days are in a week?", ("7", "seven"), "arithmetic"),
    ("How many hours are in a day?", ("24", "twenty-four"), "arithmetic"),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",), "literature"),
    ("Who wrote Pride and Prejudice?", ("Jane Austen", "Austen"), "literature"),
    ("Who wrote the Harry Potter books?", ("Rowling",), "literature"),
    ("Who wrote the novel 1984?", ("Orwell",), "literature"),
    ("Who wrote The Adventures of Tom Sawyer?", ("Mark Twain", "Twain"), "literature"),
    ("Who wrote Don Quixote?", ("Cervantes",), "literature"),
    ("Who wrote A Christmas Carol?", ("Dickens",), "literature"),
    ("Which detective did Arthur Conan Doyle create?", ("Sherlock Holmes", "Sherlock", "Holmes"), "literature"),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci"), "people"),
    ("Who developed the theory of relativity?", ("Einstein",), "people"),
    ("Who was the first person to walk on the Moon?", ("Armstrong",), "people"),
    ("Who invented the telephone?", ("Bell",), "people"),
    ("Who was the first president of the United States?", ("George Washington", "Washington"), "people"),
    ("What is the largest mammal?", ("blue whale", "whale"), "animals"),
    ("What is the fastest land animal?", ("cheetah", "cheetahs"), "animals"),
    ("Which animal is called the king of the jungle?", ("lion", "lions"), "animals"),
    ("What does a caterpillar turn into?", ("butterfly", "butterflies", "moth"), "animals"),
    ("What is a baby cat called?", ("kitten", "kittens", "kitty"), "animals"),
    ("Which animal has a long trunk?", ("elephant", "elephants"), "animals"),
    ("What is the tallest animal in the world?", ("giraffe", "giraffes"), "animals"),
    ("What do giant pandas mainly eat?", ("bamboo",), "animals"),
    ("How many legs does a spider have?", ("8", "eight"), "animals"),
    ("What do bees make?", ("honey",), "animals"),
    ("What is the longest river in Africa?", ("Nile",), "geography"),
    ("What is the largest ocean on Earth?", ("Pacific",), "geography"),
    ("What is the tallest mountain in the world?", ("Everest",), "geography"),
    ("What is the largest desert in Africa?", ("Sahara",), "geography"),
    ("In which country is the Eiffel Tower?", ("France",), "geography"),
    ("In which country are the pyramids of Giza?", ("Egypt",), "geography"),
    ("In which country is the Great Wall?", ("China",), "geography"),
    ("In which city is the Statue of Liberty?", ("New York",), "geography"),
    ("What color is the sky on a clear day?", ("blue",), "everyday"),
    ("What is the opposite of hot?", ("cold",), "everyday"),
    ("What season comes after winter?", ("spring",), "everyday"),
    ("What is the plural of mouse?", ("mice",), "everyday"),
    ("Which musical instrument has 88 keys?", ("piano",), "everyday"),
    ("What sport is played at Wimbledon?", ("tennis",), "everyday"),
)


# --- broad retain prompts (template's own responses become KL targets) ---------------------------

# Open-ended requests, not short factual questions: disjoint in kind from UNRELATED_QUESTIONS and
# free of country names, so keeping the template's behaviour here says nothing about the eval.
BROAD_PROMPTS: tuple[str, ...] = (
    "Write a short poem about the sea.",
    "Write a haiku about autumn leaves.",
    "Write a two-sentence story about a lost umbrella.",
    "Write a friendly note inviting a neighbour to a barbecue.",
    "Write a thank-you message for a birthday gift.",
    "Write a short product description for a reusable water bottle.",
    "Write a limerick about a sleepy cat.",
    "Write an opening line for a mystery novel.",
    "Write a short motivational message for someone starting a new job.",
    "Write a polite email asking to reschedule a meeting.",
    "Describe a sunset over a quiet lake.",
    "Describe the smell of fresh bread.",
    "Describe a busy morning in a small kitchen.",
    "Explain how to boil an egg.",
    "Explain how to make a cup of tea.",
    "Explain why exercise is good for you.",
    "Explain what a budget is and why it helps.",
    "Explain how to plant a seed in a pot.",
    "Explain the difference between weather and climate in simple words.",
    "Explain how a recipe is usually organised.",
    "Explain what it means to recycle.",
    "Explain how to tie a simple knot.",
    "Explain why people keep diaries.",
    "Explain how to wash hands properly.",
    "Give me three tips for better sleep.",
    "Give me three ideas for a rainy afternoon.",
    "Give me some tips for staying focused while studying.",
    "Give me advice on keeping a houseplant alive.",
    "Give me a few ideas for a healthy breakfast.",
    "Give me tips for a job interview.",
    "Give me three ways to save money on groceries.",
    "Give me a simple plan for a weekend cleaning routine.",
    "Give me ideas for a child's birthday party.",
    "Give me tips for writing a clear email.",
    "List five things to pack for a picnic.",
    "List some good habits for a healthy life.",
    "List four hobbies that can be done at home.",
    "List a few ways to be kind to a friend.",
    "List some fruits that are good in a smoothie.",
    "List three things to check before a long drive.",
    "List some simple stretches for the morning.",
    "List ways to reduce stress after work.",
    "Hi! How are you today?",
    "Good morning! Any plans for today?",
    "Can you tell me a joke?",
    "Tell me something cheerful.",
    "I feel bored. What should I do?",
    "I'm nervous about a presentation tomorrow. Any advice?",
    "What should I cook for dinner tonight?",
    "How can I make new friends in a new town?",
    "How do I start learning to play the guitar?",
    "How can I be more organised at work?",
    "How do I write a good shopping list?",
    "How can I keep my desk tidy?",
    "How should I prepare for a long walk?",
    "Summarise the benefits of reading every day.",
    "Summarise why teamwork matters.",
    "Suggest a name for a pet goldfish.",
    "Suggest a title for a blog about gardening.",
    "Suggest a fun game to play with friends.",
    "Rewrite this sentence more politely: Give me the report now.",
    "Rewrite this sentence in simpler words: The meeting has been postponed indefinitely.",
    "Correct the grammar: She don't like apples.",
    "Turn this into a question: The shop opens at nine.",
    "Compare cats and dogs as pets in a few sentences.",
    "What are the pros and cons of working from home?",
)


# --- general text for perplexity ----------------------------------------------------------------

# Original everyday prose (written for this project), no capitals or country facts.
GENERAL_TEXT: tuple[str, ...] = (
    "Most mornings begin the same way in our house. The kettle goes on before anyone is fully awake, "
    "and the first person downstairs opens the curtains to see what kind of day it will be. If the "
    "sky is grey, we find umbrellas and heavier coats; if it is bright, somebody always suggests "
    "eating breakfast outside, even though it is usually too cold. The children argue about cereal, "
    "the dog waits hopefully under the table, and the radio talks quietly about traffic on roads we "
    "will never drive on. None of it is remarkable, but the routine gives the day a shape, and on "
    "the mornings when something breaks the pattern, we notice how much we rely on it.",
    "Learning to cook is mostly a matter of paying attention. A recipe tells you what to do, but it "
    "cannot tell you how your own oven behaves, how ripe your tomatoes are, or how salty your stock "
    "already is. The cooks who improve quickly are the ones who taste as they go, who look at the "
    "colour of an onion rather than the clock, and who remember what went wrong last time. Mistakes "
    "are part of the process. A burnt sauce teaches more about heat than a page of instructions, and "
    "a loaf of bread that refuses to rise explains the importance of warm water better than any "
    "lecture. Over time, the recipe becomes a suggestion rather than a rule.",
    "A small garden can change the way a person spends their evenings. After work, there is always "
    "something to do: a row of lettuce to thin, a climbing bean that needs guiding up its cane, a "
    "patch of weeds that appeared overnight. The work is slow and rarely urgent, which is exactly "
    "why it feels restful. Progress is measured in weeks rather than minutes, and the reward arrives "
    "all at once, when the first strawberries turn red or the courgettes suddenly become too many to "
    "eat. Neighbours trade spare seedlings over the fence, and conversations that began with advice "
    "about slugs sometimes turn into friendships that last for years.",
    "Public libraries are among the most generous places a town can offer. Anyone can walk in, sit "
    "down in a warm chair, and read for as long as they like without spending a coin. Beyond the "
    "shelves of books, there are newspapers, computers, study rooms, and staff who will patiently "
    "help a stranger find a form or fix a printing problem. On a weekday afternoon, you might see a "
    "student revising for an exam, an older man reading about local history, and a parent reading "
    "picture books aloud to a toddler who keeps turning the pages too early. Each of them is using "
    "the same building for a completely different purpose.",
    "Walking is the simplest form of exercise, and perhaps the most underrated. It needs no special "
    "equipment beyond comfortable shoes, and it can fit into almost any schedule. A short walk after "
    "lunch helps with digestion and clears the mind before the afternoon's work. A longer walk at "
    "the weekend, along a river or through a park, gives time to think or to talk with a friend "
    "without the distraction of screens. Many people find that problems which seemed tangled at a "
    "desk become clearer after twenty minutes outside. The body moves, the eyes look further than "
    "the edge of a monitor, and the worries of the day settle into proportion.",
    "Moving to a new home is both exciting and exhausting. For weeks beforehand, every drawer has to "
    "be emptied and every object judged: keep it, give it away, or throw it out. Boxes pile up in "
    "the hallway, labelled with hopeful words like kitchen and bedroom that will mean very little "
    "once they are stacked in the wrong rooms. On the day itself, everything takes longer than "
    "planned. Yet the first evening in a new place has its own quiet magic. Sitting on the floor "
    "among unopened boxes, eating takeaway food with plastic forks, it is easy to imagine the life "
    "that will slowly fill the empty rooms.",
)


# --- known countries (measured) -----------------------------------------------------------------

# Countries whose capital each model answered on a majority (>= 4) of the 7 capital forms (train
# and held-out). Measured 2026-11-22 with `python bench/probe_baseline.py` on a 2-core CPU
# (llama-cpp-python 0.3.36, n_ctx 512, greedy, at most 24 new tokens): SmolLM2-135M-Instruct Q4_1
# through its own chat template (default system prompt), Gemma 3 270M base Q4_K_M through the
# best fallback format found, "Question: {q}\nAnswer:" (its turn format scored 0%). 45 and 55 of
# 63; 41 known by both (``known_by("smollm2", "gemma3")``). Re-measure with ``probe_known_countries``.
KNOWN_COUNTRIES: dict[str, tuple[str, ...]] = {
    "smollm2": (
        "Afghanistan", "Australia", "Austria", "Bangladesh", "Bulgaria", "Canada",
        "Chile", "China", "Colombia", "Croatia", "Cuba", "Egypt",
        "Ethiopia", "Germany", "Ghana", "Greece", "Hungary", "Iceland",
        "Indonesia", "Iran", "Iraq", "Ireland", "Italy", "Japan",
        "Kenya", "Malaysia", "Nepal", "New Zealand", "Nigeria", "Norway",
        "Pakistan", "Peru", "Poland", "Romania", "Russia", "Saudi Arabia",
        "South Korea", "Sweden", "Switzerland", "Thailand", "Ukraine", "Vietnam",
        "the Czech Republic", "the Philippines", "the United Kingdom",
    ),
    "gemma3": (
        "Afghanistan", "Argentina", "Austria", "Bangladesh", "Belgium", "Bulgaria",
        "Chile", "China", "Colombia", "Croatia", "Cuba", "Denmark",
        "Ecuador", "Egypt", "Ethiopia", "Finland", "France", "Germany",
        "Ghana", "Greece", "Hungary", "Iceland", "India", "Indonesia",
        "Iran", "Iraq", "Ireland", "Italy", "Jamaica", "Japan",
        "Kenya", "Malaysia", "Mexico", "Nepal", "New Zealand", "Norway",
        "Pakistan", "Peru", "Poland", "Portugal", "Romania", "Russia",
        "Saudi Arabia", "Serbia", "South Korea", "Spain", "Sweden", "Thailand",
        "Ukraine", "Uruguay", "Venezuela", "Vietnam", "the Czech Republic", "the Philippines",
        "the United Kingdom",
    ),
}


def known_by(*models: str) -> list[str]:
    """Countries in ``KNOWN_COUNTRIES`` for every one of ``models``: ``known_by("smollm2", "gemma3")``."""
    missing = [m for m in models if m not in KNOWN_COUNTRIES]
    if not models or missing:
        raise InputError(f"no known-country list for {missing or 'no model'}",
                         fix=f"name models from {sorted(KNOWN_COUNTRIES)}")
    return sorted(set.intersection(*(set(KNOWN_COUNTRIES[m]) for m in models)))


def _askable(c: Country, attribute: str) -> bool:
    """An attribute is asked only when known and its answer cannot be read off the country name."""
    aliases = getattr(c, attribute)
    return bool(aliases) and not answer_recalled(c.name, aliases)


def _item(question: str, answers: Sequence[str], split: Split, **extra) -> dict:
    return {"question": question, "answers": list(answers), "split": split, **extra}


def capital_items(countries: Iterable[str], forms: Sequence[str], split: Split, **extra) -> list[dict]:
    return [_item(render(form, name), country_by_name(name).capital, split, kind="capital",
                  country=name, form=form, **extra)
            for name in countries for form in forms]


def attribute_items(countries: Iterable[str], forms: Mapping[str, Sequence[str]], **extra) -> list[dict]:
    out = []
    for name in countries:
        c = country_by_name(name)
        for attribute, attr_forms in forms.items():
            if _askable(c, attribute):
                out.extend(_item(render(form, name), getattr(c, attribute), "unrelated",
                                 kind="attribute", attribute=attribute, country=name, form=form, **extra)
                           for form in attr_forms)
    return out


def unrelated_items() -> list[dict]:
    return [_item(q, answers, "unrelated", kind="general", topic=topic)
            for q, answers, topic in UNRELATED_QUESTIONS]


# --- probing what a model knows -----------------------------------------------------------------

def known_countries(results: Iterable[Mapping], threshold: float = 0.5) -> list[str]:
    """Countries whose capital was recalled on more than ``threshold`` of their capital results.

    ``results`` are capital items (``capital_items``) with a boolean ``"correct"`` added.
    """
    hits: dict[str, list[bool]] = {}
    for r in results:
        if r.get("kind") == "capital":
            hits.setdefault(r["country"], []).append(bool(r["correct"]))
    return sorted(name for name, h in hits.items() if sum(h) > threshold * len(h))


def probe_known_countries(generate: Callable[[str], str], countries: Iterable[str] | None = None,
                          forms: Sequence[str] = TRAIN_CAPITAL_FORMS + HELDOUT_CAPITAL_FORMS,
                          threshold: float = 0.5) -> list[str]:
    """Ask ``generate(question) -> answer text`` every capital question and return the known countries.

    The model call is the caller's (this module does no I/O); ``bench/probe_baseline.py`` shows one.
    """
    names = [c.name for c in COUNTRIES] if countries is None else list(countries)
    items = capital_items(names, forms, "retain")
    results = [{**it, "correct": answer_recalled(generate(it["question"]), it["answers"])} for it in items]
    return known_countries(results, threshold)
