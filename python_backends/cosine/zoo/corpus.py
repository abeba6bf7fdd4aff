"""Deterministic text corpora for the demo zoo.

Four domains that any machine with Python can produce without downloads, chosen to differ in vocabulary and
structure so that a drafter specialised on one of them clearly beats a general one there:
code (the standard library's own Python sources), math (arithmetic and word problems), records (JSON lines and
SQL from seeded schemas) and dialogue (templated user/assistant conversations).
"""
from __future__ import annotations

import ast
import itertools
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tqdm.auto import tqdm

DOMAINS = ("code", "math", "records", "dialogue")


@dataclass(frozen=True)
class DomainCorpus:
    name: str
    train: list[str]  # documents for the tokenizer, the target and the drafters
    heldout: list[str]  # documents never trained on: prompts and held-out loss
    prompts: list[str]  # one per held-out document: a prefix of it that never occurs in the training text


def build_corpora(train_chars: int, heldout_docs: int, seed: int, progress: bool = True) -> dict[str, DomainCorpus]:
    """Every domain's train/held-out split; train_chars is the training text budget per domain."""
    corpora = {}
    for index, name in enumerate(DOMAINS):
        rng = random.Random(seed * 1000 + index)
        bar = tqdm(total=train_chars, desc=f"corpus {name}", unit="char", unit_scale=True, disable=not progress)
        if name == "code":
            train, heldout = _split_code(rng, train_chars, heldout_docs, bar)
        else:
            train, heldout = _split_synthetic(SYNTHETIC_DOCUMENTS[name], rng, train_chars, bar)
        bar.close()
        corpora[name] = _with_prompts(name, train, heldout, heldout_docs)
    return corpora


def prompt_prefix(document: str) -> str:
    """About the first half of a document (at most 400 characters), cut just before a space and a letter.

    The byte-level pre-tokenizer always starts a token at " word", so a prompt cut there is tokenized exactly as the
    models saw this text in training; a prompt ending in a newline, say, would end in a token that in code only
    ever came before EOS.
    """
    cuts = [match.start() for match in _CLEAN_CUT.finditer(document)]
    limit = min(len(document) // 2, 400)
    return document[:max((cut for cut in cuts if cut <= limit), default=cuts[0])]


_CLEAN_CUT = re.compile(r"(?<=\S)(?= [^\W\d_])")


def _with_prompts(name: str, train: list[str], candidates: Iterable[str], wanted: int) -> DomainCorpus:
    # Templated domains repeat prefixes; held-out documents whose prompt was trained on verbatim are passed over.
    train_text = "\n".join(train)
    pairs = ((doc, prompt_prefix(doc)) for doc in candidates)
    kept = list(itertools.islice(((doc, prompt) for doc, prompt in pairs if prompt not in train_text), wanted))
    return DomainCorpus(name, train, [doc for doc, _ in kept], [prompt for _, prompt in kept])


def _fill(documents: Iterator[str], train_chars: int, bar: tqdm) -> list[str]:
    train, size = [], 0
    for doc in documents:
        if size >= train_chars:
            break
        train.append(doc)
        size += len(doc)
        bar.update(len(doc))
    return train


def _split_synthetic(make: Callable[[random.Random], str], rng: random.Random,
                     train_chars: int, bar: tqdm) -> tuple[list[str], Iterator[str]]:
    heldout_rng = random.Random(rng.random())
    train = _fill((make(rng) for _ in itertools.count()), train_chars, bar)
    return train, (make(heldout_rng) for _ in itertools.count())


# ---------------------------------------------------------------- code: the standard library's Python sources

_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "encodings", "lib2to3", "turtledemo", "idlelib", "pydoc_data"}
_CODE_LINES = range(4, 41)  # functions shorter or longer than this are left out


def _split_code(rng: random.Random, train_chars: int, heldout_docs: int, bar: tqdm) -> tuple[list[str], list[str]]:
    """Split by file so held-out documents come from files the models never saw."""
    files = _stdlib_python_files()
    rng.shuffle(files)
    heldout, used = [], 0
    for used, path in enumerate(files, start=1):
        heldout.extend(_code_documents(path))
        if len(heldout) >= 3 * heldout_docs:  # a few are passed over, see _with_prompts
            break
    train = _fill((doc for path in files[used:] for doc in _code_documents(path)), train_chars, bar)
    return train, heldout


def _stdlib_python_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in root.rglob("*.py")
                  if not _SKIPPED_STDLIB_DIRS & set(path.relative_to(root).parts))


def _code_documents(path: Path) -> list[str]:
    """The file's functions and methods, one per document, without comments and docstrings, locals renamed.

    Printing the syntax tree back normalises layout and quoting: the small models learn code, not formatting.
    """
    try:
        module = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, ValueError, OSError):  # UnicodeDecodeError is a ValueError
        return []
    scopes = [module, *(node for node in module.body if isinstance(node, ast.ClassDef))]
    functions = [node for scope in scopes for node in scope.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    documents = [ast.unparse(_with_canonical_locals(_without_docstrings(function))) + "\n" for function in functions]
    return [document for document in documents if document.count("\n") in _CODE_LINES]


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _with_canonical_locals(function: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
    """Renames parameters and local variables to a, b, c, ... in order of first appearance.

    Local names are most of what makes stdlib code unpredictable to a small model; renamed, code keeps its
    structure (calls, attributes, control flow) and the code specialist has something learnable to specialise on.
    """
    declared_outside = {name for node in ast.walk(function) if isinstance(node, (ast.Global, ast.Nonlocal))
                        for name in node.names}
    uses = sorted((node for node in ast.walk(function) if isinstance(node, (ast.Name, ast.arg))),
                  key=lambda node: (node.lineno, node.col_offset))
    stored = {node.arg for node in uses if isinstance(node, ast.arg)} | {
        node.id for node in uses if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    local = [name for name in dict.fromkeys(_identifier(node) for node in uses)
             if name in stored and name not in declared_outside and name not in _KEPT_NAMES]
    taken = {_identifier(node) for node in uses} - set(local)
    fresh = (name for name in _CANONICAL_NAMES if name not in taken)
    renamed = dict(zip(local, fresh))
    for node in uses:
        if isinstance(node, ast.arg):
            node.arg = renamed.get(node.arg, node.arg)
        else:
            node.id = renamed.get(node.id, node.id)
    return function


_KEPT_NAMES = {"self", "cls"}
_CANONICAL_NAMES = [*"abcdefghijklmnopqrstuvwxyz", *(f"v{index}" for index in range(1000))]


def _identifier(node: ast.Name | ast.arg) -> str:
    return node.arg if isinstance(node, ast.arg) else node.id


# ---------------------------------------------------------------- math: word problems

_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe")
_ITEMS = ("apples", "books", "marbles", "stickers", "coins", "pencils", "cookies", "stamps", "shells", "cards")
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("crate", "crates"))

# Many phrasings rather than one "What is a + b?": most of a problem's tokens are wording a drafter can learn, and
# there is enough of it that a drafter trained on this domain alone learns it clearly better than a general one.
_WORD_PROBLEMS = {
    "+": ("{name} has {a} {items} and finds {b} more. How many {items} does {name} have now?",
          "{name} reads {a} pages on Monday and {b} pages on Tuesday. How many pages does {name} read in total?",
          "{name} has {a} {items}. {other} has {b} more {items} than {name}. How many {items} does {other} have?",
          "There are {a} birds in a tree and {b} more birds land on it. How many birds are in the tree now?",
          "A shop sells {a} {items} in the morning and {b} in the afternoon. How many {items} does it sell that day?",
          "{name} walks {a} kilometres on Saturday and {b} kilometres on Sunday. How far does {name} walk?",
          "A class has {a} girls and {b} boys. How many children are in the class?",
          "{name} is {a} years old. How old will {name} be in {b} years?",
          "A farmer plants {a} trees in spring and {b} trees in autumn. How many trees does the farmer plant?",
          "{name} scores {a} points in the first game and {b} points in the second. What is the total score?"),
    "-": ("{name} had {a} {items} and gave {b} to {other}. How many {items} does {name} have left?",
          "There are {a} {items} on the table. {name} takes {b} of them. How many {items} are still on the table?",
          "A bus carries {a} people. At the next stop {b} people get off. How many people are still on the bus?",
          "{name} has {a} euros and spends {b} euros on lunch. How many euros does {name} have left?",
          "A book has {a} pages. {name} has read {b} pages. How many pages are left to read?",
          "A tank holds {a} litres of water. {b} litres leak out. How many litres are left in the tank?",
          "{name} is {a} years old and {other} is {b} years old. How much older is {name}?",
          "A baker makes {a} loaves of bread and sells {b}. How many loaves are not sold?",
          "There were {a} cars in the car park. {b} cars drove away. How many cars are in the car park now?",
          "{name} needs {a} {items} for a project and already has {b}. How many more {items} does {name} need?"),
    "*": ("A {container} holds {b} {items}. How many {items} are in {a} {containers}?",
          "{name} buys {a} packs of {items}. Each pack has {b} {items}. How many {items} does {name} buy in total?",
          "{name} saves {b} coins every week for {a} weeks. How many coins does {name} save?",
          "A train has {a} cars with {b} seats in each car. How many seats does the train have?",
          "A garden has {a} rows of flowers with {b} flowers in each row. How many flowers are in the garden?",
          "{name} runs {b} laps every day for {a} days. How many laps does {name} run?",
          "One ticket costs {b} euros. How much do {a} tickets cost?",
          "Each table has {b} chairs around it. How many chairs are around {a} tables?",
          "{name} gives {b} {items} to each of {a} friends. How many {items} does {name} give away?",
          "A building has {a} floors with {b} windows on each floor. How many windows does the building have?"),
}


def _word_problem(rng: random.Random) -> str:
    op = rng.choice(sorted(_WORD_PROBLEMS))
    # Operands stay small: the answers are a few hundred facts a small target can learn within the budget.
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = sorted((rng.randint(1, 20), rng.randint(1, 20)), reverse=op == "-")
    name, other = rng.sample(_NAMES, 2)
    container, containers = rng.choice(_CONTAINERS)
    question = rng.choice(_WORD_PROBLEMS[op]).format(name=name, other=other, items=rng.choice(_ITEMS), a=a, b=b,
                                                     container=container, containers=containers)
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Q: {question}\nA: {a} {op} {b} = {answer}. The answer is {answer}.\n"


def _math_document(rng: random.Random) -> str:
    return "".join(_word_problem(rng) for _ in range(rng.randint(3, 6)))


# ---------------------------------------------------------------- records: JSON lines and SQL from seeded schemas

_FIRST = ("Alice", "Bruno", "Carla", "Diego", "Elena", "Felix", "Greta", "Hannah", "Ivan", "Julia", "Karim",
          "Lena", "Marco", "Nina", "Oscar", "Paula", "Rafael", "Sofia", "Tomas", "Ursula")
_LAST = ("Silva", "Moreau", "Schmidt", "Rossi", "Novak", "Garcia", "Kowalski", "Jensen", "Dubois", "Costa")
_CITIES = ("Lisbon", "Lyon", "Berlin", "Milan", "Prague", "Madrid", "Warsaw", "Oslo", "Vienna", "Porto")
_PRODUCTS = ("laptop", "monitor", "keyboard", "mouse", "headset", "webcam", "charger", "tablet", "router")
_ADJECTIVES = ("Compact", "Wireless", "Classic", "Smart", "Premium", "Portable", "Ergonomic")
_CATEGORIES = ("electronics", "office", "garden", "kitchen", "sports", "toys")
_DEPARTMENTS = ("sales", "finance", "engineering", "support", "marketing", "legal")
_STATUSES = ("pending", "shipped", "delivered", "cancelled")
_ACTIONS = ("login", "logout", "view", "click", "purchase", "search")
_PAGES = ("/home", "/cart", "/checkout", "/products", "/account", "/help")


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_FIRST), rng.choice(_LAST)


def _customer(rng: random.Random, key: int) -> dict:
    first, last = _person(rng)
    return {"id": key, "name": f"{first} {last}", "email": f"{first.lower()}.{last.lower()}@example.com",
            "city": rng.choice(_CITIES), "age": rng.randint(18, 80)}


def _catalogue() -> list[dict]:
    # Fixed facts (a product's SKU, category and price) reward a drafter that spends its capacity on this domain.
    rng = random.Random("catalogue")
    return [{"sku": f"SKU-{1000 + index}", "title": f"{adjective} {product.title()}",
             "category": rng.choice(_CATEGORIES), "price": round(rng.uniform(5, 500), 2)}
            for index, (adjective, product) in enumerate(itertools.product(_ADJECTIVES, _PRODUCTS))]


_CATALOGUE = _catalogue()


def _order(rng: random.Random, key: int) -> dict:
    item = rng.choice(_CATALOGUE)
    return {"order_id": key, "customer_id": rng.randint(100, 999), "product": item["title"],
            "quantity": rng.randint(1, 5), "unit_price": item["price"], "status": rng.choice(_STATUSES)}


def _product(rng: random.Random, key: int) -> dict:
    return {**rng.choice(_CATALOGUE), "in_stock": rng.random() < 0.7}


def _employee(rng: random.Random, key: int) -> dict:
    first, last = _person(rng)
    return {"id": key, "first_name": first, "last_name": last, "department": rng.choice(_DEPARTMENTS),
            "salary": rng.randrange(30000, 120000, 500), "manager_id": rng.randint(1, 50)}


def _event(rng: random.Random, key: int) -> dict:
    return {"event_id": key, "user_id": rng.randint(1000, 9999), "action": rng.choice(_ACTIONS),
            "page": rng.choice(_PAGES),
            "timestamp": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                         f"{rng.randint(0, 23):02d}:{rng.randrange(0, 60, 5):02d}:00"}


_SCHEMAS = {"customers": _customer, "orders": _order, "products": _product, "employees": _employee,
            "events": _event}


def _json_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _sql_value(value) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return f"'{value}'" if isinstance(value, str) else str(value)


def _sql_type(value) -> str:
    if isinstance(value, bool):
        return "BOOLEAN"
    return {int: "INTEGER", float: "REAL", str: "TEXT"}[type(value)]


def _records_document(rng: random.Random) -> str:
    table = rng.choice(sorted(_SCHEMAS))
    first_key = rng.randint(100, 9000)
    rows = [_SCHEMAS[table](rng, first_key + i) for i in range(rng.randint(4, 7))]
    columns = list(rows[0])
    if rng.random() < 0.5:
        body = "".join("{" + ", ".join(f'"{c}": {_json_value(row[c])}' for c in columns) + "}\n" for row in rows)
        return f"-- table: {table} (json)\n{body}"
    create = f"CREATE TABLE {table} (" + ", ".join(f"{c} {_sql_type(rows[0][c])}" for c in columns) + ");\n"
    inserts = "".join(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ("
                      + ", ".join(_sql_value(row[c]) for c in columns) + ");\n" for row in rows)
    return f"-- table: {table} (sql)\n{create}{inserts}"


# ---------------------------------------------------------------- dialogue: templated user/assistant conversations

_DEVICES = ("laptop", "phone", "printer", "router", "tablet", "smart watch")
_PROBLEMS = ("turning off", "freezing", "losing its connection", "running slowly", "showing a blank screen")
_FIXES = ("restarting it", "updating the software", "charging it for an hour", "resetting the settings")
_DISHES = ("pancakes", "tomato soup", "banana bread", "fried rice", "lentil curry", "apple pie")
_INGREDIENTS = ("flour", "eggs", "milk", "butter", "rice", "onions", "garlic", "tomatoes", "sugar", "lentils")
_WEATHER = ("sunny", "rainy", "cloudy", "windy", "snowy", "foggy")
_GENRES = ("mystery", "science fiction", "history", "fantasy", "biography", "poetry")
_AUTHORS = ("Mara Quill", "Jon Avery", "Lucia Fenn", "Theo Marsh", "Iris Vale", "Owen Hart")


def _tech_support(rng: random.Random) -> list[str]:
    device, problem = rng.choice(_DEVICES), rng.choice(_PROBLEMS)
    fix, other_fix = rng.sample(_FIXES, 2)
    code = rng.randint(100, 999)
    return [f"User: Hi, my {device} keeps {problem}. Can you help?",
            f"Assistant: I'm sorry to hear that your {device} keeps {problem}. Have you tried {fix}?",
            f"User: Yes, I tried {fix} but it did not help.",
            f"Assistant: Then please try {other_fix}. If your {device} still keeps {problem}, "
            f"contact support and mention error code {code}.",
            "User: Thanks, I will try that.",
            "Assistant: You're welcome! Let me know if there is anything else I can help you with."]


def _recipe(rng: random.Random) -> list[str]:
    dish = rng.choice(_DISHES)
    (first, second, third), minutes = _COOKBOOK[dish]
    people = rng.randint(2, 8)
    return [f"User: How do I make {dish} for {people} people?",
            f"Assistant: For {dish} for {people} people you need {first}, {second} and {third}. "
            f"Mix the {first} with the {second}, add the {third}, and cook for {minutes} minutes.",
            f"User: Can I make it without {second}?",
            f"Assistant: Yes, you can replace the {second} with a little more {first}. "
            f"The {dish} will still be ready in about {minutes} minutes."]


def _weather(rng: random.Random) -> list[str]:
    city, sky = rng.choice(_CITIES), rng.choice(_WEATHER)
    temperature, tomorrow = rng.randint(-5, 35), rng.choice(_WEATHER)
    return [f"User: What is the weather like in {city} today?",
            f"Assistant: Today in {city} it is {sky} with a temperature of {temperature} degrees.",
            "User: And what about tomorrow?",
            f"Assistant: Tomorrow in {city} it will be {tomorrow}. "
            f"{'Take an umbrella.' if tomorrow == 'rainy' else 'Enjoy your day!'}"]


def _library() -> dict[str, list[tuple[str, str, int]]]:
    # Each book's author and year are fixed facts, as are each dish's ingredients and cooking time below.
    rng = random.Random("library")
    titles = [f"The {adjective} {noun}" for adjective in ("Silent", "Last", "Hidden", "Golden", "Broken", "Distant")
              for noun in ("River", "Garden", "Clock", "Lantern", "Mountain", "Letter")]
    books = {genre: [] for genre in _GENRES}
    for title in titles:
        books[rng.choice(_GENRES)].append((title, rng.choice(_AUTHORS), rng.randint(1950, 2023)))
    return books


def _cookbook() -> dict[str, tuple[list[str], int]]:
    rng = random.Random("cookbook")
    return {dish: (rng.sample(_INGREDIENTS, 3), rng.randrange(10, 65, 5)) for dish in _DISHES}


_LIBRARY, _COOKBOOK = _library(), _cookbook()


def _books(rng: random.Random) -> list[str]:
    genre = rng.choice([genre for genre, books in _LIBRARY.items() if books])
    title, author, year = rng.choice(_LIBRARY[genre])
    return [f"User: Can you recommend a good {genre} book?",
            f"Assistant: Sure! I recommend \"{title}\" by {author}, a {genre} book published in {year}.",
            f"User: What else has {author} written?",
            f"Assistant: {author} has written several other books, but \"{title}\" from {year} is the best known."]


_LANGUAGES = ("Spanish", "French", "German", "Italian")
_DICTIONARY = {
    "hello": ("hola", "bonjour", "hallo", "ciao"), "thank you": ("gracias", "merci", "danke", "grazie"),
    "good night": ("buenas noches", "bonne nuit", "gute Nacht", "buona notte"),
    "water": ("agua", "eau", "Wasser", "acqua"), "bread": ("pan", "pain", "Brot", "pane"),
    "cat": ("gato", "chat", "Katze", "gatto"), "dog": ("perro", "chien", "Hund", "cane"),
    "house": ("casa", "maison", "Haus", "casa"), "book": ("libro", "livre", "Buch", "libro"),
    "friend": ("amigo", "ami", "Freund", "amico"), "apple": ("manzana", "pomme", "Apfel", "mela"),
    "sun": ("sol", "soleil", "Sonne", "sole"),
}


def _translation(rng: random.Random) -> list[str]:
    word = rng.choice(sorted(_DICTIONARY))
    first, second = rng.sample(range(len(_LANGUAGES)), 2)
    return [f"User: How do you say \"{word}\" in {_LANGUAGES[first]}?",
            f"Assistant: In {_LANGUAGES[first]}, \"{word}\" is \"{_DICTIONARY[word][first]}\".",
            f"User: And in {_LANGUAGES[second]}?",
            f"Assistant: In {_LANGUAGES[second]}, \"{word}\" is \"{_DICTIONARY[word][second]}\"."]


def _timetable() -> dict[tuple[str, str], tuple[int, int]]:
    rng = random.Random("timetable")
    return {(origin, destination): (rng.randint(2, 9), rng.randrange(20, 150, 5))
            for origin in _CITIES[:6] for destination in _CITIES[:6] if origin != destination}


_TIMETABLE = _timetable()


def _train_trip(rng: random.Random) -> list[str]:
    origin, destination = rng.choice(sorted(_TIMETABLE))
    hours, price = _TIMETABLE[origin, destination]
    return [f"User: How long does the train from {origin} to {destination} take?",
            f"Assistant: The train from {origin} to {destination} takes about {hours} hours.",
            "User: How much is a ticket?",
            f"Assistant: A ticket from {origin} to {destination} costs {price} euros. "
            "You can buy it at the station or online."]


_OPENING_HOURS = {"museum": ("10:00", "18:00"), "library": ("09:00", "20:00"), "pharmacy": ("08:00", "19:00"),
                  "bakery": ("07:00", "13:00"), "post office": ("09:00", "17:00"),
                  "swimming pool": ("06:00", "22:00")}


def _opening_hours(rng: random.Random) -> list[str]:
    place = rng.choice(sorted(_OPENING_HOURS))
    opens, closes = _OPENING_HOURS[place]
    day = rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"))
    return [f"User: When is the {place} open on {day}?",
            f"Assistant: On {day} the {place} opens at {opens} and closes at {closes}.",
            "User: Do I need to book in advance?",
            f"Assistant: No, you can just come to the {place} any time between {opens} and {closes}."]


_TOPICS = (_tech_support, _recipe, _weather, _books, _translation, _train_trip, _opening_hours)


def _dialogue_document(rng: random.Random) -> str:
    topics = rng.sample(_TOPICS, rng.randint(1, 2))
    return "".join(line + "\n" for topic in topics for line in topic(rng))


SYNTHETIC_DOCUMENTS: dict[str, Callable[[random.Random], str]] = {
    "math": _math_document, "records": _records_document, "dialogue": _dialogue_document}
