"""The raw material of speckv's prompts, and the rule that keeps suites and the draft's pool apart.

Every source is split into two disjoint *families* before any prompt is made from it:

- the **suite** family feeds the profiling suites (what evaluation holds out by prompt);
- the **pool** family feeds :func:`speckv.prompts.distill_pool` (the draft's training data).

A family is decided per *unit of near-duplication*, not per prompt: per HumanEval problem, per
standard-library function, per coding task (whatever the wording around it), per math template
(whatever its numbers and names), per chat topic (whatever the question form), per
documentation source (pydoc topics vs module docstrings). So no pool prompt is the same text as
a suite prompt with other numbers, names or phrasing; :func:`speckv.prompts.overlap` checks it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import re
import warnings
from typing import Final


def family(key: str, suite_share: int = 5) -> str:
    """``"suite"`` for one key in ``suite_share`` (stable across runs and Python versions)."""
    digest = hashlib.sha1(key.encode()).digest()
    return "suite" if int.from_bytes(digest[:4], "big") % suite_share == 0 else "pool"


# ------------------------------------------------------------------------------ code: tasks
#: programming tasks phrased as "Write a Python function that ...". The first 30 trained the
#: first draft and stay in the pool; the family of the others is decided by :func:`family`.
CODE_TASKS: Final = (
    "reverses the words in a sentence", "counts vowels in a string", "merges two sorted lists",
    "checks if a string is a palindrome", "computes the factorial of n", "flattens a nested list",
    "returns the n-th Fibonacci number", "removes duplicates from a list while keeping order",
    "finds the most common element in a list", "converts Celsius to Fahrenheit",
    "parses a date string in ISO format", "reads a CSV file into a list of dictionaries",
    "groups words by their first letter", "computes the median of a list of numbers",
    "validates an email address with a regex", "implements binary search",
    "rotates a matrix by 90 degrees", "checks balanced parentheses",
    "computes the greatest common divisor", "implements a stack class",
    "sorts a list of tuples by the second item", "counts word frequencies in a text",
    "transposes a matrix", "generates all permutations of a string",
    "chunks a list into pieces of size n", "implements bubble sort", "finds prime numbers below n",
    "capitalizes every word in a sentence", "sums the digits of an integer",
    "implements a simple LRU cache",
    # families decided by hash from here on
    "checks whether two strings are anagrams", "converts a Roman numeral to an integer",
    "converts an integer to a Roman numeral", "finds the longest common prefix of a list of "
    "strings", "computes the least common multiple of two numbers", "implements merge sort",
    "implements quicksort", "implements insertion sort", "implements selection sort",
    "implements heap sort with the heapq module", "finds the second largest number in a list",
    "returns the running sum of a list", "checks whether a year is a leap year",
    "counts the number of set bits in an integer", "converts a binary string to an integer",
    "converts an integer to its hexadecimal representation",
    "checks if a number is a perfect square", "finds all divisors of a number",
    "computes the power set of a list", "generates all combinations of k items from a list",
    "finds the longest word in a sentence", "removes all punctuation from a string",
    "counts the lines, words and characters of a text file", "merges two dictionaries",
    "inverts a dictionary", "finds the key with the largest value in a dictionary",
    "sorts a dictionary by its values", "implements a queue with two stacks",
    "implements a singly linked list", "reverses a linked list", "detects a cycle in a linked "
    "list", "implements a binary search tree with insert and search",
    "computes the height of a binary tree", "performs a breadth-first search on a graph",
    "performs a depth-first search on a graph", "finds the shortest path with Dijkstra's "
    "algorithm", "performs a topological sort of a directed graph",
    "counts connected components in an undirected graph", "checks whether a graph is bipartite",
    "computes the edit distance between two strings", "finds the longest increasing "
    "subsequence", "solves the 0/1 knapsack problem", "counts the ways to climb n stairs",
    "finds the maximum subarray sum", "computes the n-th row of Pascal's triangle",
    "computes the Collatz sequence of a number", "checks whether a number is an Armstrong "
    "number", "converts a string to title case without using str.title",
    "compresses a string with run-length encoding", "decompresses a run-length encoded string",
    "encrypts a message with the Caesar cipher", "decrypts a Vigenere cipher",
    "validates an IPv4 address", "parses a URL query string into a dictionary",
    "converts snake_case to camelCase", "converts camelCase to snake_case",
    "wraps text to a given line width", "pads a number with leading zeros",
    "formats a number of seconds as hours, minutes and seconds",
    "computes the number of days between two dates", "returns the weekday of a date",
    "reads a JSON file and prints its keys", "writes a list of dictionaries to a CSV file",
    "finds all files with a given extension in a directory", "computes the SHA-256 hash of a "
    "file", "downloads nothing but builds a URL from parts", "retries a function call with "
    "exponential backoff", "times how long a function takes with a decorator",
    "memoizes a function with a decorator", "implements a context manager that changes the "
    "working directory", "splits a list into two halves", "interleaves two lists",
    "rotates a list by k positions", "finds the missing number in a list from 1 to n",
    "finds two numbers in a list that add up to a target", "checks whether a list is sorted",
    "moves all zeros in a list to the end", "counts the occurrences of each character",
    "finds the first non-repeating character in a string", "checks whether a sentence is a "
    "pangram", "computes the dot product of two vectors", "multiplies two matrices",
    "computes the determinant of a 3x3 matrix", "normalizes a list of numbers to the range 0 "
    "to 1", "computes the standard deviation of a list", "computes a moving average",
    "finds the mode of a list of numbers", "rounds a number to n significant digits",
    "converts kilometres to miles", "computes compound interest", "computes the area of a "
    "triangle from its three sides", "checks whether three lengths form a triangle",
    "computes the distance between two points", "generates a random password",
    "shuffles a list without using random.shuffle", "samples k items from a stream with "
    "reservoir sampling", "implements a simple tokenizer for arithmetic expressions",
    "evaluates a postfix expression", "converts an infix expression to postfix",
    "implements a trie with insert and prefix search", "implements a min-heap class",
    "implements a circular buffer", "implements a simple event emitter",
    "parses command-line arguments with argparse", "logs messages to a file with the logging "
    "module", "implements a thread-safe counter", "runs several functions concurrently with "
    "threads", "reads a large file line by line and counts matches of a pattern",
    "builds a histogram of word lengths", "finds anagram groups in a list of words",
    "checks whether a Sudoku row, column and box are valid", "implements Conway's Game of "
    "Life for one step", "finds the greatest product of two numbers in a list",
    "converts a nested dictionary to a flat one with dotted keys",
    "deep-copies a nested list without the copy module", "compares two version strings",
    "implements a simple bank account class with deposit and withdraw",
    "implements a rectangle class with area and perimeter", "implements a vector class with "
    "addition and scaling", "validates a credit card number with the Luhn algorithm",
    "counts the islands in a grid of 0s and 1s", "finds the median of two sorted lists",
    "merges overlapping intervals", "finds the majority element of a list",
    "computes the product of a list except self", "generates the first n prime numbers",
    "checks whether a number is prime", "computes the sum of the first n natural numbers",
    "converts a list of strings to integers, skipping invalid ones",
    "finds the intersection of two lists", "finds the union of two lists without duplicates",
    "removes empty strings from a list", "replaces every vowel in a string with '*'",
    "counts how many times a substring occurs", "checks whether brackets in code are nested "
    "correctly", "implements a stopwatch class", "parses a simple INI file",
)

#: how a coding task is asked; every form of one task belongs to the task's family.
CODE_FORMS: Final = (
    "Write a Python function that {t}. Include a docstring and a short example.",
    "Write a Python function that {t}, with type hints, and explain how it works.",
    "Show me how to write Python code that {t}, and give two test cases.",
    "Implement, in Python, a function that {t}. Keep it short and readable.",
    "I need a Python function that {t}. Please write it and explain its time complexity.",
    "Write a function that {t} in Python, then show an example call and its output.",
)

#: standard-library modules whose public functions become "implement this" tasks.
API_MODULES: Final = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "dataclasses", "difflib",
    "fnmatch", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "math", "mimetypes",
    "ntpath", "operator", "os", "pathlib", "pickle", "platform", "posixpath", "pprint",
    "quopri", "random", "re", "shlex", "shutil", "statistics", "string", "struct", "tempfile",
    "textwrap", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse",
    "uuid", "warnings", "zipfile", "ast", "codecs", "contextlib", "datetime", "decimal", "email",
    "enum", "fractions", "secrets", "smtplib", "socket", "sqlite3", "subprocess", "tarfile",
    "threading", "timeit", "webbrowser", "wave", "zlib", "binascii", "doctest", "filecmp",
    "fileinput", "getopt", "gettext", "graphlib", "numbers", "pkgutil", "pstats", "sched",
    "selectors", "site", "stat", "sysconfig", "tabnanny", "token", "trace", "uu", "xdrlib",
    "zipimport", "cmd", "code", "codeop", "configparser", "dis", "ftplib", "imaplib", "netrc",
    "pdb", "poplib", "pydoc", "queue", "reprlib", "runpy", "symtable", "tomllib", "unittest",
)


def _first_paragraph(doc: str, limit: int = 600) -> str:
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return para[:limit].rsplit(" ", 1)[0] if len(para) > limit else para


def _import_quietly(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # a module missing or broken on this Python is simply skipped
            return None


#: the per-process memory address in a default value's repr (``<function copy2 at 0x7f...>``),
#: which would make a prompt's text differ between any two runs.
_ADDRESS: Final = re.compile(r" at 0x[0-9a-fA-F]+")
#: functions another library replaces in the standard library when it is imported
#: (``torch.package`` replaces ``inspect.getfile``): left out everywhere, so that the prompts
#: do not depend on what the process imported before building them.
REPLACED_AT_RUNTIME: Final = frozenset({"inspect.getfile"})


class _Shown:
    """A parameter default as a prompt shows it (its ``repr`` is the given text)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _shown(value: object) -> str:
    """A default value's repr that reads the same in every process: without memory addresses,
    and ``...`` for a container of live objects (``logging.shutdown``'s list of handlers)."""
    text = repr(value)
    if isinstance(value, (list, dict, set)) and value:
        try:
            ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return "..."
    return _ADDRESS.sub("", text)


def _signature(fn) -> str:
    sig = inspect.signature(fn)
    params = [p.replace(default=_Shown(_shown(p.default))) if p.default is not p.empty else p
              for p in sig.parameters.values()]
    return str(sig.replace(parameters=params))


def api_functions() -> list[tuple[str, str, str]]:
    """``(qualified name, signature, first doc paragraph)`` of documented stdlib functions
    and methods, in a fixed order, the same in every process: a default value shows without
    its memory address (``copy_function=<function copy2>``), and functions other libraries
    replace at runtime (:data:`REPLACED_AT_RUNTIME`) are left out."""
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for modname in API_MODULES:
        module = _import_quietly(modname)
        if module is None:
            continue
        members = []
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                members.append((f"{modname}.{attr}", attr, obj))
            elif inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    fn = vars(obj)[meth]
                    if not meth.startswith("_") and inspect.isfunction(fn):
                        members.append((f"{modname}.{attr}.{meth}", meth, fn))
        for qual, name, fn in members:
            doc = inspect.getdoc(fn) or ""
            if len(doc) < 60 or qual in seen or qual in REPLACED_AT_RUNTIME:
                continue
            try:
                sig = _signature(fn)
            except (TypeError, ValueError):
                continue
            seen.add(qual)
            out.append((qual, f"{name}{sig}", _first_paragraph(doc)))
    return out


def api_prompt(signature: str, doc: str) -> str:
    return (f"Write a Python function `{signature}` that does the following, without using the "
            f"standard library function of the same name. Include a docstring.\n\n{doc}")


# ------------------------------------------------------------------------------------- math
MATH_NAMES: Final = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Greta", "Hiro", "Ines",
                     "Jonas", "Kemi", "Luca", "Mira", "Noor", "Omar", "Priya", "Quinn", "Rosa",
                     "Sami", "Tara")
MATH_ITEMS: Final = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps",
                     "shells", "cards", "balloons", "oranges", "tickets", "coins", "plants")

#: the suite's templates (the first profiling suites were drawn from exactly these).
MATH_SUITE_TEMPLATES: Final = (
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} gives away {z}. "
    "How many {item} does {a} have now? Explain step by step.",
    "A shop sells {item} at {p} dollars each. {a} buys {x} of them and pays with a "
    "{bill}-dollar bill. How much change does {a} get? Show your work.",
    "{a} reads {x} pages every day. The book has {n} pages. How many days does {a} need to "
    "finish it? Explain your reasoning.",
    "A train travels at {s} kilometres per hour for {h} hours, then at {t} kilometres per hour "
    "for {k} more hours. How far does it travel in total? Solve step by step.",
    "{a} and {b} share {n} {item} in the ratio {r1}:{r2}. How many {item} does each get? "
    "Show each step.",
    "A rectangle is {x} cm long and {y} cm wide. What are its area and its perimeter? "
    "Explain the calculation.",
    "{a} saves {p} dollars each week. How many weeks will it take to save {n} dollars? "
    "Work it out step by step.",
    "There are {x} students in a class and {q} percent of them like math. How many students "
    "like math? Show your reasoning.",
    "{a} bakes {x} trays of {item} with {y} on each tray and sells {z} of them. How many are "
    "left? Solve it step by step.",
    "What is {x} multiplied by {y}, minus {z}? Explain each step of the calculation.",
)

#: the pool's templates: other situations, never the suite's wording with other numbers.
MATH_POOL_TEMPLATES: Final = (
    "{a} buys {x} {item} for {p} dollars each and {y} more for {t} dollars each. What is the "
    "total cost? Explain step by step.",
    "A tank holds {n} litres of water. It leaks {p} litres per hour. How many hours until it "
    "is empty? Show your reasoning.",
    "{a} ran {h} kilometres on Monday and {k} kilometres more on Tuesday than on Monday. How "
    "far did {a} run on both days together? Solve it step by step.",
    "A recipe needs {p} eggs for {h} people. How many eggs are needed for {x} people? Explain "
    "the calculation.",
    "The price of a jacket is {n} dollars. It is on sale for {q} percent off. What is the sale "
    "price? Show your work.",
    "{a} is {x} years old. {b} is {y} years older than {a}. How old will {b} be in {h} years? "
    "Explain your answer.",
    "A garden has {x} rows with {y} {item} in each row. {z} of them are picked. How many "
    "remain? Work it out step by step.",
    "A cyclist covers {n} kilometres in {h} hours. What is the average speed? Then how long "
    "would {s} kilometres take at that speed? Explain each step.",
    "{a} has {n} dollars and spends {q} percent of it on {item}. How much money is left? Show "
    "each step.",
    "A box holds {p} {item}. How many boxes are needed to pack {n} {item}? Explain your "
    "reasoning.",
    "The sum of two numbers is {n} and their difference is {x}. What are the two numbers? "
    "Solve it step by step.",
    "A square has a perimeter of {x} metres. What is the length of one side and what is its "
    "area? Show your work.",
    "{a} earns {p} dollars per hour and works {x} hours a week. How much does {a} earn in {k} "
    "weeks? Explain the calculation.",
    "A bus carries {x} passengers. At the first stop {z} get off and {y} get on. How many "
    "passengers are on the bus now? Solve step by step.",
    "What is {q} percent of {n}? Explain how to compute a percentage.",
    "A pizza is cut into {p} slices. {a} eats {h} slices and {b} eats {k} slices. What "
    "fraction of the pizza is left? Show your reasoning.",
    "{a} walks {s} metres in one minute. How many metres does {a} walk in {x} minutes, and how "
    "many kilometres is that? Explain each step.",
    "A class of {x} students is split into groups of {p}. How many full groups are there and "
    "how many students are left over? Work it out step by step.",
    "Divide {n} by {p} and give the quotient and the remainder. Explain the long division.",
    "A farmer has {x} chickens and {y} cows. How many legs do the animals have in total? "
    "Explain your answer.",
    "{a} pays {n} dollars for {x} {item}. What is the price of one, and of {y} of them? Show "
    "your work.",
    "A map uses a scale of 1 cm to {p} km. Two towns are {h} cm apart on the map. How far "
    "apart are they really? Solve step by step.",
    "The temperature was {x} degrees in the morning and fell by {y} degrees by night. What "
    "was the temperature at night? Explain the calculation.",
    "A water bottle holds {s} millilitres. How many bottles can be filled from {n} litres? "
    "Show your reasoning.",
)


# --------------------------------------------------------------------------------------- chat
#: hand-written questions of the first chat suite (all in the suite family).
CHAT_QUESTIONS: Final = (
    "What are some good ways to fall asleep faster?",
    "Can you suggest a simple weekly meal plan for a busy student?",
    "How do I politely decline a meeting invitation from my manager?",
    "What is the difference between weather and climate?",
    "Give me three ideas for a rainy-day activity with kids.",
    "How can I start learning to play the guitar as an adult?",
    "Why is the sky blue? Explain it simply.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "What should I pack for a three-day hiking trip?",
    "How do vaccines help the body fight disease?",
    "Suggest a name for a small bakery that sells sourdough bread.",
    "What are the benefits of drinking enough water every day?",
    "How do I make a good first impression at a job interview?",
    "Explain what a budget is and how to make one.",
    "What is a good routine for studying for exams?",
    "Can you recommend some tips for keeping houseplants alive?",
    "How does recycling help the environment?",
    "Write a friendly message inviting my friends to a picnic on Saturday.",
    "What are some easy exercises I can do at home without equipment?",
    "How do I deal with stress before a big presentation?",
    "What is the difference between a virus and a bacterium?",
    "Give me some advice for learning a new language.",
    "How can I save money on groceries?",
    "Describe the water cycle in a few sentences.",
    "What makes a good password, and how can I remember it?",
    "How do I write a polite complaint email to a company?",
    "What are some fun facts about octopuses?",
    "How can I be more productive when working from home?",
    "Why do leaves change colour in autumn?",
    "Suggest a few questions to ask when adopting a dog.",
    "What is the best way to learn touch typing?",
    "How do solar panels produce electricity?",
    "Give me a simple recipe for pancakes.",
    "How should I prepare for a long flight?",
    "What is the difference between a crocodile and an alligator?",
    "How can I help a friend who is feeling lonely?",
    "What are the main causes of traffic jams in cities?",
    "Explain what inflation is in simple words.",
    "How do I choose a good book to read next?",
    "What are some tips for taking better photos with a phone?",
    "How do bees make honey?",
    "What should I do if I lock myself out of my house?",
)

#: how a chat topic is asked; every form of one topic belongs to the topic's family.
CHAT_FORMS: Final = (
    "What are some tips for {t}?", "Can you explain {t} to a beginner?",
    "Why is {t} important?", "Give me a short plan for {t}.",
    "What are common mistakes people make with {t}?", "How do I get better at {t}?",
)

#: topics of the first draft's pool (they stay in the pool).
CHAT_POOL_TOPICS: Final = (
    "public speaking", "gardening", "running a first marathon", "cooking rice", "saving energy "
    "at home", "writing a CV", "time management", "learning to swim", "caring for a cat",
    "planning a birthday party", "reading more books", "keeping a journal", "meditation",
    "moving to a new city", "painting with watercolours", "cycling to work", "making friends",
    "negotiating a salary", "baking bread", "choosing a laptop", "learning chess",
    "organizing a closet", "staying focused", "eating more vegetables", "traveling on a budget",
    "writing poetry", "teaching a child to ride a bike", "composting", "night photography",
    "sleeping well", "learning to draw", "building a habit", "hosting a dinner", "camping",
    "birdwatching", "volunteering", "decluttering", "learning to knit", "stretching",
    "car maintenance", "brewing tea", "studying history", "keeping fish", "playing piano",
)

#: further topics; :func:`family` decides which side each one is on.
CHAT_TOPICS: Final = (
    "learning to cook pasta", "making coffee at home", "training a puppy", "growing tomatoes",
    "writing a cover letter", "preparing for a driving test", "learning to juggle",
    "keeping a budget", "paying off debt", "starting a small business", "writing a blog",
    "learning to code", "keeping a tidy desk", "going on a first date", "planning a wedding",
    "raising chickens", "making sushi", "learning to ski", "ice skating", "rock climbing",
    "doing yoga", "lifting weights safely", "losing weight healthily", "quitting sugar",
    "cooking for a large family", "packing a suitcase", "travelling with kids",
    "learning sign language", "speaking up in meetings", "giving feedback to a colleague",
    "asking for a raise", "working night shifts", "staying warm in winter",
    "keeping cool in summer", "saving water", "reducing plastic waste", "repairing a bike tyre",
    "painting a room", "assembling furniture", "hanging a picture", "fixing a leaky tap",
    "choosing running shoes", "buying a used car", "renting a first apartment",
    "living with roommates", "making a podcast", "editing videos", "taking notes in class",
    "writing an essay", "preparing a speech", "learning vocabulary", "reading poetry",
    "visiting a museum", "planning a road trip", "hiking in the mountains", "swimming in the "
    "sea", "fishing", "sailing", "kayaking", "building a birdhouse", "making candles",
    "sewing a button", "ironing shirts", "doing laundry", "cleaning a kitchen",
    "organizing a garage", "setting up a home office", "backing up photos",
    "protecting personal data online", "spotting phishing emails", "using a password manager",
    "choosing a phone plan", "reducing screen time", "sleeping after jet lag",
    "caring for a newborn", "talking to teenagers", "helping an elderly parent",
    "dealing with grief", "handling criticism", "managing anger", "building confidence",
    "learning to say no", "setting goals", "keeping New Year's resolutions",
    "celebrating a friend's promotion", "writing a wedding toast", "choosing a gift",
    "wrapping presents", "decorating for a holiday", "throwing a surprise party",
    "learning to dance", "singing in a choir", "playing the drums", "learning the violin",
    "collecting stamps", "starting a book club", "writing a short story", "keeping bees",
    "growing herbs indoors", "caring for succulents", "planting a tree", "attracting birds to "
    "a garden", "keeping a rabbit", "walking a dog in the rain", "visiting the dentist",
    "getting a flu shot", "managing allergies", "treating a small burn", "doing first aid",
    "staying hydrated while running", "cooking with lentils", "making soup",
    "baking a birthday cake", "making jam", "grilling vegetables", "packing a healthy lunch",
    "eating out on a diet", "reading food labels", "meal prepping", "fermenting vegetables",
    "making yogurt", "buying fresh fish", "storing fruit", "choosing a watermelon",
    "learning astronomy", "using a telescope", "watching a meteor shower", "learning about "
    "dinosaurs", "understanding tides", "learning about volcanoes", "understanding "
    "earthquakes", "reading a map", "using a compass", "learning knots", "building a campfire",
    "surviving a heat wave", "preparing for a power cut", "saving for retirement",
    "understanding interest rates", "opening a bank account", "filing taxes", "investing in "
    "index funds", "splitting bills with friends", "shopping second-hand", "selling things "
    "online", "negotiating a price", "writing a product review", "returning a faulty item",
    "complaining to a landlord", "meeting new neighbours", "joining a sports club",
    "coaching a kids' football team", "refereeing a game", "learning tennis",
    "improving a golf swing", "swimming laps", "training for a triathlon", "warming up before "
    "exercise", "recovering after a workout", "stretching at a desk", "improving posture",
    "choosing a mattress", "napping", "waking up early", "keeping a morning routine",
    "working in a team", "leading a meeting", "running a workshop", "mentoring a junior "
    "colleague", "interviewing a candidate", "writing meeting minutes", "managing a project",
    "prioritizing tasks", "avoiding procrastination", "learning touch typing on a new "
    "keyboard", "using spreadsheets", "making a presentation", "learning photography",
    "editing photos", "printing photos", "making a scrapbook", "learning calligraphy",
    "doing origami", "building model trains", "solving crossword puzzles", "playing sudoku",
    "learning a card trick", "playing board games with family", "teaching kids to share",
    "reading to children", "choosing a school", "helping with homework", "learning to "
    "whistle", "learning to meditate while walking", "practising gratitude",
)


# ------------------------------------------------------------------------------ summarization
#: modules whose documentation feeds the pool's summarization prompts (the suite reads pydoc
#: topics, a different text).
DOC_MODULES: Final = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re", "sched",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile", "zlib", "abc", "bisect",
    "calendar", "codecs", "configparser", "copy", "fnmatch", "glob", "gzip", "hashlib", "io",
    # further modules for the larger pool
    "ast", "base64", "binascii", "cmd", "code", "concurrent.futures", "contextvars", "ctypes",
    "dis", "doctest", "email.message", "filecmp", "fileinput", "ftplib", "getopt", "gettext",
    "graphlib", "html.parser", "http.server", "imaplib", "importlib", "ipaddress", "locale",
    "lzma", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "os", "pdb", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats",
    "queue", "reprlib", "runpy", "secrets", "selectors", "shelve", "shlex", "signal", "site",
    "smtplib", "socketserver", "ssl", "stat", "struct", "symtable", "sysconfig", "tempfile",
    "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types", "unicodedata",
    "urllib.request", "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipapp", "zipimport", "zoneinfo", "bz2", "array", "cProfile",
    "colorsys", "dbm", "faulthandler", "hmac", "keyword", "linecache", "modulefinder", "quopri",
    "rlcompleter", "sre_compile", "tabnanny", "tomllib", "turtle", "venv", "xmlrpc.client",
)


def module_docs() -> list[str]:
    """Docstrings of :data:`DOC_MODULES`: modules, their public classes, functions and methods."""
    docs: list[str] = []
    for name in DOC_MODULES:
        module = _import_quietly(name)
        if module is None:
            continue
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == module.__name__:
                docs.extend(inspect.getdoc(fn) or "" for meth, fn in sorted(vars(obj).items())
                            if not meth.startswith("_") and inspect.isfunction(fn))
    return docs
