"""The world-facts pretraining corpus: English documents generated from a seed and a table of 163 countries.

The project has to run on a fresh machine with no downloads, so it cannot fetch a text corpus. Instead it generates
one: documents built from a small, hand-written table of real countries (capital, continent, language, currency)
plus general prose from a tiny template grammar. Everything is a pure function of the seed (`random.Random(seed)`,
never the global random state), so the same seed always gives byte-identical text.

It is the pretraining stage's default corpus (`pretraining_documents`, `write_pretraining_jsonl`; reached through
`llm_jax.tasks.builtin_corpus`) and the base of the end-to-end experiment (pretrain → SFT on capital questions →
reward model → RLHF). `split_countries` holds some countries out of the SFT data; the corpus still mentions every
country, so answers about held-out countries can only come from knowledge learned in pretraining. SFT teaches the
answer format `capital_answer(country)` ("The capital of X is Y."), and the corpus contains that exact sentence for
every country several times, alongside many other phrasings.

Roughly 35 % of documents are general prose (people, travel, markets, school, letters, nature) so a small model also
learns ordinary English grammar. Prose that mentions countries only states things that agree with the facts table.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

from llm_jax.files import write_atomically


@dataclass(frozen=True)
class Country:
  """One row of the facts table. All strings are plain ASCII."""

  name: str
  capital: str
  continent: str
  language: str  # an official/national language; the most widely spoken if several
  currency: str  # common English name, used as "the {currency}"


_AF, _AS, _EU = "Africa", "Asia", "Europe"
_NA, _SA, _OC = "North America", "South America", "Oceania"

# Deliberately left out, so that every template below is both true and grammatical with a bare country name:
# - names that need "the" in English (the United States, the United Kingdom, the Netherlands, the Philippines,
#   the Bahamas, the Gambia, ...);
# - disputed or split capitals (Bolivia, South Africa, Sri Lanka, Cote d'Ivoire, Eswatini, Israel, ...) and
#   capitals named like the country (Singapore, Djibouti, San Marino, ...);
# - currencies in flux (Zimbabwe).
COUNTRIES: tuple[Country, ...] = (
  # Europe
  Country("Albania", "Tirana", _EU, "Albanian", "Albanian lek"),
  Country("Andorra", "Andorra la Vella", _EU, "Catalan", "euro"),
  Country("Austria", "Vienna", _EU, "German", "euro"),
  Country("Belarus", "Minsk", _EU, "Russian", "Belarusian ruble"),
  Country("Belgium", "Brussels", _EU, "Dutch", "euro"),
  Country("Bosnia and Herzegovina", "Sarajevo", _EU, "Bosnian", "convertible mark"),
  Country("Bulgaria", "Sofia", _EU, "Bulgarian", "euro"),  # euro since 2026
  Country("Croatia", "Zagreb", _EU, "Croatian", "euro"),
  Country("Cyprus", "Nicosia", _EU, "Greek", "euro"),
  Country("Czechia", "Prague", _EU, "Czech", "Czech koruna"),
  Country("Denmark", "Copenhagen", _EU, "Danish", "Danish krone"),
  Country("Estonia", "Tallinn", _EU, "Estonian", "euro"),
  Country("Finland", "Helsinki", _EU, "Finnish", "euro"),
  Country("France", "Paris", _EU, "French", "euro"),
  Country("Germany", "Berlin", _EU, "German", "euro"),
  Country("Greece", "Athens", _EU, "Greek", "euro"),
  Country("Hungary", "Budapest", _EU, "Hungarian", "Hungarian forint"),
  Country("Iceland", "Reykjavik", _EU, "Icelandic", "Icelandic krona"),
  Country("Ireland", "Dublin", _EU, "English", "euro"),
  Country("Italy", "Rome", _EU, "Italian", "euro"),
  Country("Latvia", "Riga", _EU, "Latvian", "euro"),
  Country("Liechtenstein", "Vaduz", _EU, "German", "Swiss franc"),
  Country("Lithuania", "Vilnius", _EU, "Lithuanian", "euro"),
  Country("Luxembourg", "Luxembourg City", _EU, "Luxembourgish", "euro"),
  Country("Malta", "Valletta", _EU, "Maltese", "euro"),
  Country("Moldova", "Chisinau", _EU, "Romanian", "Moldovan leu"),
  Country("Montenegro", "Podgorica", _EU, "Montenegrin", "euro"),
  Country("North Macedonia", "Skopje", _EU, "Macedonian", "Macedonian denar"),
  Country("Norway", "Oslo", _EU, "Norwegian", "Norwegian krone"),
  Country("Poland", "Warsaw", _EU, "Polish", "Polish zloty"),
  Country("Portugal", "Lisbon", _EU, "Portuguese", "euro"),
  Country("Romania", "Bucharest", _EU, "Romanian", "Romanian leu"),
  Country("Russia", "Moscow", _EU, "Russian", "Russian ruble"),
  Country("Serbia", "Belgrade", _EU, "Serbian", "Serbian dinar"),
  Country("Slovakia", "Bratislava", _EU, "Slovak", "euro"),
  Country("Slovenia", "Ljubljana", _EU, "Slovene", "euro"),
  Country("Spain", "Madrid", _EU, "Spanish", "euro"),
  Country("Sweden", "Stockholm", _EU, "Swedish", "Swedish krona"),
  Country("Switzerland", "Bern", _EU, "German", "Swiss franc"),
  Country("Ukraine", "Kyiv", _EU, "Ukrainian", "Ukrainian hryvnia"),
  # Asia
  Country("Afghanistan", "Kabul", _AS, "Dari", "Afghan afghani"),
  Country("Armenia", "Yerevan", _AS, "Armenian", "Armenian dram"),
  Country("Azerbaijan", "Baku", _AS, "Azerbaijani", "Azerbaijani manat"),
  Country("Bahrain", "Manama", _AS, "Arabic", "Bahraini dinar"),
  Country("Bangladesh", "Dhaka", _AS, "Bengali", "Bangladeshi taka"),
  Country("Bhutan", "Thimphu", _AS, "Dzongkha", "Bhutanese ngultrum"),
  Country("Brunei", "Bandar Seri Begawan", _AS, "Malay", "Brunei dollar"),
  Country("Cambodia", "Phnom Penh", _AS, "Khmer", "Cambodian riel"),
  Country("China", "Beijing", _AS, "Mandarin Chinese", "Chinese yuan"),
  Country("East Timor", "Dili", _AS, "Tetum", "US dollar"),
  Country("Georgia", "Tbilisi", _AS, "Georgian", "Georgian lari"),
  Country("India", "New Delhi", _AS, "Hindi", "Indian rupee"),
  Country("Indonesia", "Jakarta", _AS, "Indonesian", "Indonesian rupiah"),
  Country("Iran", "Tehran", _AS, "Persian", "Iranian rial"),
  Country("Iraq", "Baghdad", _AS, "Arabic", "Iraqi dinar"),
  Country("Japan", "Tokyo", _AS, "Japanese", "Japanese yen"),
  Country("Jordan", "Amman", _AS, "Arabic", "Jordanian dinar"),
  Country("Kazakhstan", "Astana", _AS, "Kazakh", "Kazakhstani tenge"),
  Country("Kuwait", "Kuwait City", _AS, "Arabic", "Kuwaiti dinar"),
  Country("Kyrgyzstan", "Bishkek", _AS, "Kyrgyz", "Kyrgyzstani som"),
  Country("Laos", "Vientiane", _AS, "Lao", "Lao kip"),
  Country("Lebanon", "Beirut", _AS, "Arabic", "Lebanese pound"),
  Country("Malaysia", "Kuala Lumpur", _AS, "Malay", "Malaysian ringgit"),
  Country("Mongolia", "Ulaanbaatar", _AS, "Mongolian", "Mongolian tugrik"),
  Country("Myanmar", "Naypyidaw", _AS, "Burmese", "Myanmar kyat"),
  Country("Nepal", "Kathmandu", _AS, "Nepali", "Nepalese rupee"),
  Country("North Korea", "Pyongyang", _AS, "Korean", "North Korean won"),
  Country("Oman", "Muscat", _AS, "Arabic", "Omani rial"),
  Country("Pakistan", "Islamabad", _AS, "Urdu", "Pakistani rupee"),
  Country("Qatar", "Doha", _AS, "Arabic", "Qatari riyal"),
  Country("Saudi Arabia", "Riyadh", _AS, "Arabic", "Saudi riyal"),
  Country("South Korea", "Seoul", _AS, "Korean", "South Korean won"),
  Country("Syria", "Damascus", _AS, "Arabic", "Syrian pound"),
  Country("Tajikistan", "Dushanbe", _AS, "Tajik", "Tajikistani somoni"),
  Country("Thailand", "Bangkok", _AS, "Thai", "Thai baht"),
  Country("Turkey", "Ankara", _AS, "Turkish", "Turkish lira"),
  Country("Turkmenistan", "Ashgabat", _AS, "Turkmen", "Turkmenistan manat"),
  Country("Uzbekistan", "Tashkent", _AS, "Uzbek", "Uzbekistani som"),
  Country("Vietnam", "Hanoi", _AS, "Vietnamese", "Vietnamese dong"),
  Country("Yemen", "Sanaa", _AS, "Arabic", "Yemeni rial"),
  # Africa
  Country("Algeria", "Algiers", _AF, "Arabic", "Algerian dinar"),
  Country("Angola", "Luanda", _AF, "Portuguese", "Angolan kwanza"),
  Country("Benin", "Porto-Novo", _AF, "French", "West African CFA franc"),
  Country("Botswana", "Gaborone", _AF, "English", "Botswana pula"),
  Country("Burkina Faso", "Ouagadougou", _AF, "Moore", "West African CFA franc"),
  Country("Cameroon", "Yaounde", _AF, "French", "Central African CFA franc"),
  Country("Cape Verde", "Praia", _AF, "Portuguese", "Cape Verdean escudo"),
  Country("Chad", "N'Djamena", _AF, "French", "Central African CFA franc"),
  Country("Egypt", "Cairo", _AF, "Arabic", "Egyptian pound"),
  Country("Equatorial Guinea", "Malabo", _AF, "Spanish", "Central African CFA franc"),
  Country("Eritrea", "Asmara", _AF, "Tigrinya", "Eritrean nakfa"),
  Country("Ethiopia", "Addis Ababa", _AF, "Amharic", "Ethiopian birr"),
  Country("Gabon", "Libreville", _AF, "French", "Central African CFA franc"),
  Country("Ghana", "Accra", _AF, "English", "Ghanaian cedi"),
  Country("Guinea", "Conakry", _AF, "French", "Guinean franc"),
  Country("Guinea-Bissau", "Bissau", _AF, "Portuguese", "West African CFA franc"),
  Country("Kenya", "Nairobi", _AF, "Swahili", "Kenyan shilling"),
  Country("Lesotho", "Maseru", _AF, "Sesotho", "Lesotho loti"),
  Country("Liberia", "Monrovia", _AF, "English", "Liberian dollar"),
  Country("Libya", "Tripoli", _AF, "Arabic", "Libyan dinar"),
  Country("Madagascar", "Antananarivo", _AF, "Malagasy", "Malagasy ariary"),
  Country("Malawi", "Lilongwe", _AF, "English", "Malawian kwacha"),
  Country("Mali", "Bamako", _AF, "Bambara", "West African CFA franc"),
  Country("Mauritania", "Nouakchott", _AF, "Arabic", "Mauritanian ouguiya"),
  Country("Mauritius", "Port Louis", _AF, "English", "Mauritian rupee"),
  Country("Morocco", "Rabat", _AF, "Arabic", "Moroccan dirham"),
  Country("Mozambique", "Maputo", _AF, "Portuguese", "Mozambican metical"),
  Country("Namibia", "Windhoek", _AF, "English", "Namibian dollar"),
  Country("Niger", "Niamey", _AF, "Hausa", "West African CFA franc"),
  Country("Nigeria", "Abuja", _AF, "English", "Nigerian naira"),
  Country("Rwanda", "Kigali", _AF, "Kinyarwanda", "Rwandan franc"),
  Country("Sao Tome and Principe", "Sao Tome", _AF, "Portuguese", "dobra"),
  Country("Senegal", "Dakar", _AF, "French", "West African CFA franc"),
  Country("Sierra Leone", "Freetown", _AF, "English", "Sierra Leonean leone"),
  Country("Somalia", "Mogadishu", _AF, "Somali", "Somali shilling"),
  Country("South Sudan", "Juba", _AF, "English", "South Sudanese pound"),
  Country("Sudan", "Khartoum", _AF, "Arabic", "Sudanese pound"),
  Country("Tanzania", "Dodoma", _AF, "Swahili", "Tanzanian shilling"),
  Country("Togo", "Lome", _AF, "French", "West African CFA franc"),
  Country("Tunisia", "Tunis", _AF, "Arabic", "Tunisian dinar"),
  Country("Uganda", "Kampala", _AF, "English", "Ugandan shilling"),
  Country("Zambia", "Lusaka", _AF, "English", "Zambian kwacha"),
  # North America (including Central America and the Caribbean)
  Country("Antigua and Barbuda", "Saint John's", _NA, "English", "East Caribbean dollar"),
  Country("Barbados", "Bridgetown", _NA, "English", "Barbadian dollar"),
  Country("Belize", "Belmopan", _NA, "English", "Belize dollar"),
  Country("Canada", "Ottawa", _NA, "English", "Canadian dollar"),
  Country("Costa Rica", "San Jose", _NA, "Spanish", "Costa Rican colon"),
  Country("Cuba", "Havana", _NA, "Spanish", "Cuban peso"),
  Country("Dominica", "Roseau", _NA, "English", "East Caribbean dollar"),
  Country("El Salvador", "San Salvador", _NA, "Spanish", "US dollar"),
  Country("Grenada", "Saint George's", _NA, "English", "East Caribbean dollar"),
  Country("Guatemala", "Guatemala City", _NA, "Spanish", "Guatemalan quetzal"),
  Country("Haiti", "Port-au-Prince", _NA, "Haitian Creole", "Haitian gourde"),
  Country("Honduras", "Tegucigalpa", _NA, "Spanish", "Honduran lempira"),
  Country("Jamaica", "Kingston", _NA, "English", "Jamaican dollar"),
  Country("Mexico", "Mexico City", _NA, "Spanish", "Mexican peso"),
  Country("Nicaragua", "Managua", _NA, "Spanish", "Nicaraguan cordoba"),
  Country("Panama", "Panama City", _NA, "Spanish", "Panamanian balboa"),
  Country("Saint Kitts and Nevis", "Basseterre", _NA, "English", "East Caribbean dollar"),
  Country("Saint Lucia", "Castries", _NA, "English", "East Caribbean dollar"),
  Country("Saint Vincent and the Grenadines", "Kingstown", _NA, "English", "East Caribbean dollar"),
  Country("Trinidad and Tobago", "Port of Spain", _NA, "English", "Trinidad and Tobago dollar"),
  # South America
  Country("Argentina", "Buenos Aires", _SA, "Spanish", "Argentine peso"),
  Country("Brazil", "Brasilia", _SA, "Portuguese", "Brazilian real"),
  Country("Chile", "Santiago", _SA, "Spanish", "Chilean peso"),
  Country("Colombia", "Bogota", _SA, "Spanish", "Colombian peso"),
  Country("Ecuador", "Quito", _SA, "Spanish", "US dollar"),
  Country("Guyana", "Georgetown", _SA, "English", "Guyanese dollar"),
  Country("Paraguay", "Asuncion", _SA, "Spanish", "Paraguayan guarani"),
  Country("Peru", "Lima", _SA, "Spanish", "Peruvian sol"),
  Country("Suriname", "Paramaribo", _SA, "Dutch", "Surinamese dollar"),
  Country("Uruguay", "Montevideo", _SA, "Spanish", "Uruguayan peso"),
  Country("Venezuela", "Caracas", _SA, "Spanish", "Venezuelan bolivar"),
  # Oceania
  Country("Australia", "Canberra", _OC, "English", "Australian dollar"),
  Country("Fiji", "Suva", _OC, "English", "Fijian dollar"),
  Country("Micronesia", "Palikir", _OC, "English", "US dollar"),
  Country("New Zealand", "Wellington", _OC, "English", "New Zealand dollar"),
  Country("Palau", "Ngerulmud", _OC, "Palauan", "US dollar"),
  Country("Papua New Guinea", "Port Moresby", _OC, "Tok Pisin", "Papua New Guinean kina"),
  Country("Samoa", "Apia", _OC, "Samoan", "Samoan tala"),
  Country("Tonga", "Nuku'alofa", _OC, "Tongan", "Tongan paanga"),
  Country("Tuvalu", "Funafuti", _OC, "Tuvaluan", "Australian dollar"),
  Country("Vanuatu", "Port Vila", _OC, "Bislama", "Vanuatu vatu"),
)

# The demo question ("Where is the capital of China?") must be answerable in the SFT-taught format, so China
# always lands in the train split.
_ALWAYS_TRAIN = "China"


# ---------------------------------------------------------------------------
# Helpers for the SFT / reward-model / RLHF stages
# ---------------------------------------------------------------------------

# The exact answer sentence SFT teaches; the corpus uses it for every country.
CANONICAL_CAPITAL_TEMPLATE = "The capital of {country} is {capital}."

_QUESTION_TEMPLATES = (
  "Where is the capital of {country}?",
  "What is the capital of {country}?",
  "What is the capital city of {country}?",
  "What city is the capital of {country}?",
  "Which city is the capital of {country}?",
  "Name the capital of {country}.",
  "Tell me the capital of {country}.",
  "Do you know the capital of {country}?",
  "Can you tell me what the capital of {country} is?",
  "I am curious: what is the capital of {country}?",
)


def capital_question_templates() -> tuple[str, ...]:
  """Varied ways to ask for a capital; each has one `{country}` slot."""
  return _QUESTION_TEMPLATES


def capital_answer(country: Country) -> str:
  """The canonical answer, exactly "The capital of {name} is {capital}."."""
  return CANONICAL_CAPITAL_TEMPLATE.format(country=country.name, capital=country.capital)


def split_countries(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[tuple[Country, ...], tuple[Country, ...]]:
  """Splits `COUNTRIES` into train and held-out countries, deterministically from `seed`.

  Held-out countries never appear in SFT data, so a model can only answer them from pretraining knowledge. China
  is always in train (the demo question "Where is the capital of China?" should be answered in the format SFT
  teaches).

  Args:
    seed: Seeds the shuffle that picks the held-out countries.
    held_out_fraction: `round(held_out_fraction * len(COUNTRIES))` countries are held out; in [0, 1).

  Returns:
    `(train, held_out)`, both in the order of `COUNTRIES`.

  Raises:
    ValueError: `held_out_fraction` is outside [0, 1).
  """
  if not 0.0 <= held_out_fraction < 1.0:
    raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
  candidates = [c for c in COUNTRIES if c.name != _ALWAYS_TRAIN]
  random.Random(seed).shuffle(candidates)
  held_out_names = {c.name for c in candidates[: round(held_out_fraction * len(COUNTRIES))]}
  train = tuple(c for c in COUNTRIES if c.name not in held_out_names)
  held_out = tuple(c for c in COUNTRIES if c.name in held_out_names)
  return train, held_out


# ---------------------------------------------------------------------------
# Fact documents
# ---------------------------------------------------------------------------

# Slots: {country} {capital} {continent} {language} {currency}. Index 0 of the capital templates is the canonical
# SFT answer sentence.
_FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
  "capital": (
    CANONICAL_CAPITAL_TEMPLATE,
    "{capital} is the capital of {country}.",
    "{capital} is the capital city of {country}.",
    "{country_possessive} capital is {capital}.",
    "In {country}, the capital is {capital}.",
    "The capital city of {country} is {capital}.",
    "{country} has its capital in {capital}.",
    "{capital} serves as the capital of {country}.",
    "The city of {capital} is the capital of {country}.",
    "{country} is a country whose capital is {capital}.",
  ),
  "language": (
    "People in {country} speak {language}.",
    "The main language of {country} is {language}.",
    "In {country}, people speak {language}.",
    "{language} is spoken in {country}.",
    "{language} is the main language of {country}.",
    "The language of {country} is {language}.",
    "Many people in {country} speak {language}.",
    "{country} is a country where people speak {language}.",
    "In {capital}, the capital of {country}, people speak {language}.",
  ),
  "currency": (
    "The currency of {country} is the {currency}.",
    "In {country}, people pay with the {currency}.",
    "{country} uses the {currency} as its currency.",
    "The money used in {country} is the {currency}.",
    "The {currency} is the currency of {country}.",
    "People in {country} buy and sell things with the {currency}.",
    "The official currency of {country} is the {currency}.",
    "Shops in {country} take payment in the {currency}.",
    "In {country}, prices are given in the {currency}.",
  ),
  "continent": (
    "{country} is a country in {continent}.",
    "{country} is located in {continent}.",
    "{country} lies in {continent}.",
    "{country} is in {continent}.",
    "{country} is one of the countries of {continent}.",
    "On a map, you can find {country} in {continent}.",
    "The country of {country} is part of {continent}.",
    "In {continent}, there is a country called {country}.",
    "{capital}, the capital of {country}, is a city in {continent}.",
  ),
}

# Sentences that state two facts at once, keyed by the facts they cover.
_COMBINED_FACT_TEMPLATES: dict[frozenset[str], tuple[str, ...]] = {
  frozenset({"capital", "continent"}): (
    "{country}, whose capital is {capital}, is a country in {continent}.",
    "{capital} is the capital of {country}, a country in {continent}.",
    "{country} is a country in {continent}, and its capital is {capital}.",
  ),
  frozenset({"capital", "language"}): (
    "The capital of {country} is {capital}, and the main language is {language}.",
    "{country} has its capital in {capital}, and its people speak {language}.",
  ),
  frozenset({"language", "currency"}): (
    "In {country}, people speak {language} and pay with the {currency}.",
    "People in {country} speak {language} and use the {currency}.",
  ),
  frozenset({"capital", "currency"}): ("The capital of {country} is {capital}, and its currency is the {currency}.",),
}

_FACT_INTROS = (
  "Here are a few facts about {country}.",
  "This is a short note about {country}.",
  "Let us learn about {country}.",
  "Students often learn about {country} in geography class.",
  "What do we know about {country}?",
)

_OTHER_RELATIONS = ("language", "currency", "continent")


def _fact_slots(country: Country) -> dict[str, str]:
  name = country.name
  return {
    "country": name,
    "country_possessive": name + ("'" if name.endswith("s") else "'s"),
    "capital": country.capital,
    "continent": country.continent,
    "language": country.language,
    "currency": country.currency,
  }


def _fact_sentences(rng: random.Random, country: Country, relations: list[str], force_canonical: bool) -> list[str]:
  """Renders `relations` of `country` as sentences with varied templates."""
  slots = _fact_slots(country)
  remaining = list(relations)
  sentences = []
  if force_canonical:
    sentences.append(CANONICAL_CAPITAL_TEMPLATE.format(**slots))
    remaining.remove("capital")
  # Sometimes fold two facts into one sentence, for variety of structure. Only with 3+ facts left, so a document
  # always keeps at least 2 sentences.
  if len(remaining) >= 3 and rng.random() < 0.5:
    fitting = [key for key in _COMBINED_FACT_TEMPLATES if key <= set(remaining)]
    if fitting:
      key = rng.choice(fitting)
      sentences.append(rng.choice(_COMBINED_FACT_TEMPLATES[key]).format(**slots))
      remaining = [r for r in remaining if r not in key]
  sentences.extend(rng.choice(_FACT_TEMPLATES[r]).format(**slots) for r in remaining)
  rng.shuffle(sentences)
  return sentences


def _country_deck(rng: random.Random) -> Iterator[Country]:
  """An endless stream of countries: every country once per shuffled round, so all get as many fact documents."""
  while True:
    deck = list(COUNTRIES)
    rng.shuffle(deck)
    yield from deck


_OTHER_COUNTRY_BRIDGES = (
  "Another country in {continent} is {country}.",
  "{country} is also in {continent}.",
  "{country} is another country in {continent}.",
)


def _fact_document(rng: random.Random, main: Country, force_canonical: bool) -> str:
  """2-8 sentences: several facts about `main`, maybe one or two about others."""
  sentences = []
  if rng.random() < 0.3:
    sentences.append(rng.choice(_FACT_INTROS).format(country=main.name))
  relations = ["capital", *rng.sample(_OTHER_RELATIONS, rng.randint(1, 3))]
  sentences += _fact_sentences(rng, main, relations, force_canonical)

  # Intro + main facts give at most 5 sentences. An extra country adds at most 3 (bridge + two facts) and is only
  # added while there are <= 5, so a document never exceeds 8 sentences.
  for _ in range(rng.choice((0, 0, 1, 1, 2))):
    if len(sentences) > 5:
      break
    if rng.random() < 0.6:
      # Bridge sentence to another country on the same continent.
      other = rng.choice([c for c in COUNTRIES if c.continent == main.continent and c != main])
      bridge = rng.choice(_OTHER_COUNTRY_BRIDGES)
      sentences.append(bridge.format(continent=main.continent, country=other.name))
      known = ("capital", "language", "currency")  # the bridge gave the continent
    else:
      other = rng.choice([c for c in COUNTRIES if c != main])
      known = ("capital", *_OTHER_RELATIONS)
    relations = rng.sample(known, rng.randint(1, 2))
    sentences += _fact_sentences(rng, other, relations, force_canonical=False)
  return " ".join(sentences)


# ---------------------------------------------------------------------------
# General prose documents
# ---------------------------------------------------------------------------


def _with_article(noun: str) -> str:
  return ("an " if noun[0] in "aeiou" else "a ") + noun


_NAMES = (
  ("Anna", "she"),
  ("Omar", "he"),
  ("Mei", "she"),
  ("Kofi", "he"),
  ("Lucia", "she"),
  ("Ivan", "he"),
  ("Amara", "she"),
  ("Pedro", "he"),
  ("Yuki", "she"),
  ("Ravi", "he"),
  ("Fatima", "she"),
  ("Lars", "he"),
  ("Nadia", "she"),
  ("Tomas", "he"),
  ("Aisha", "she"),
  ("Kenji", "he"),
  ("Elena", "she"),
  ("Samuel", "he"),
  ("Priya", "she"),
  ("Mateo", "he"),
  ("Zara", "she"),
  ("Ali", "he"),
  ("Olga", "she"),
  ("Jonas", "he"),
  ("Leila", "she"),
  ("David", "he"),
  ("Ines", "she"),
  ("Hassan", "he"),
  ("Marta", "she"),
  ("Chen", "he"),
  ("Grace", "she"),
  ("Pablo", "he"),
  ("Hana", "she"),
  ("Felix", "he"),
  ("Rosa", "she"),
  ("Musa", "he"),
  ("Clara", "she"),
  ("Arjun", "he"),
  ("Eva", "she"),
  ("Diego", "he"),
)

_PRONOUNS = {
  "she": {"he": "she", "He": "She", "his": "her", "His": "Her", "him": "her"},
  "he": {"he": "he", "He": "He", "his": "his", "His": "His", "him": "him"},
}

_JOBS = (
  "teacher",
  "baker",
  "farmer",
  "doctor",
  "engineer",
  "nurse",
  "bus driver",
  "fisher",
  "painter",
  "merchant",
  "carpenter",
  "writer",
  "musician",
  "tailor",
  "pilot",
  "shopkeeper",
  "gardener",
  "librarian",
  "mechanic",
  "cook",
  "architect",
  "journalist",
)

# (description, what a sensible person did about it)
_WEATHER = (
  ("cold and windy", "wore a warm coat"),
  ("hot and dry", "stayed in the shade"),
  ("rainy", "carried an umbrella"),
  ("foggy", "walked slowly and carefully"),
  ("sunny and bright", "ate lunch outside"),
  ("cloudy and cool", "took a light jacket"),
  ("stormy", "stayed indoors until noon"),
  ("warm and pleasant", "opened all the windows"),
)

# Words drawn fresh for every sentence that names the slot (see _Slots).
_VOCAB: dict[str, tuple[str, ...]] = {
  "place": (
    "market",
    "library",
    "harbor",
    "park",
    "train station",
    "bakery",
    "museum",
    "river",
    "school",
    "post office",
    "hospital",
    "old bridge",
    "main square",
    "public garden",
    "bookshop",
    "cafe",
  ),
  "food": (
    "bread",
    "rice",
    "apples",
    "fresh fish",
    "cheese",
    "oranges",
    "eggs",
    "onions",
    "tomatoes",
    "beans",
    "honey",
    "potatoes",
    "carrots",
    "lemons",
    "flour",
    "olives",
  ),
  "drink": ("tea", "coffee", "hot milk", "warm water with lemon", "cocoa"),
  "a_job": tuple(_with_article(job) for job in _JOBS),
  "job": _JOBS,
  "a_animal": (
    "a black cat",
    "an old dog",
    "a white horse",
    "a small bird",
    "a goat",
    "an owl",
    "a fox",
    "a tired donkey",
    "a brown rabbit",
    "a large crow",
  ),
  "topic": (
    "music",
    "old films",
    "the weather",
    "their families",
    "history",
    "football",
    "the price of bread",
    "a new book",
    "the sea",
    "their plans for the summer",
    "the stars",
    "cooking",
    "a famous painter",
    "the old days",
  ),
  "duration": ("an hour", "two hours", "a long time", "most of the afternoon", "a few minutes", "half a day"),
  "trip_duration": ("a few hours", "many hours", "most of the day", "a whole night"),
  "relative": ("sister", "brother", "aunt", "uncle", "grandmother", "grandfather", "cousin"),
  "street_state": (
    "busy with cars and buses",
    "quiet and almost empty",
    "full of children on their way to school",
    "wet after the night rain",
    "crowded with people buying food",
    "bright with colorful flags",
  ),
  "afternoon_activity": (
    "visited a small museum",
    "repaired an old bicycle",
    "painted a picture of the river",
    "played chess with a neighbor",
    "cleaned the kitchen",
    "walked along the river",
    "practiced the piano",
    "planted flowers in the garden",
    "fixed a broken chair",
  ),
  "evening_activity": (
    "read a few pages of a novel",
    "listened to the radio",
    "cooked a simple dinner",
    "called an old friend",
    "wrote in a diary",
    "watched the stars from the window",
    "played cards with the family",
    "made a list of things to do the next day",
  ),
  "season": ("spring", "summer", "autumn", "winter"),
  "landscape": (
    "green hills and small farms",
    "a wide brown river",
    "high mountains covered in snow",
    "long beaches and blue water",
    "forests and quiet lakes",
    "dry fields under a bright sun",
    "villages with red roofs",
    "herds of cattle near the road",
  ),
  "goods": (
    "cotton cloth",
    "wooden tables",
    "clay pots",
    "leather shoes",
    "woolen blankets",
    "spices",
    "copper pans",
    "woven baskets",
    "glass bottles",
    "silver rings",
  ),
  "adj_wind": ("cold", "gentle", "strong", "warm", "salty", "dusty"),
  "direction": ("north", "south", "east", "west", "sea", "mountains"),
  "sky_state": (
    "clouds had cleared and the sun was shining",
    "sky was grey and a light rain had begun",
    "air was hot and still",
    "wind had grown stronger and the trees were bending",
    "fog had lifted from the valley",
  ),
  "color": ("orange", "pink", "deep red", "purple", "gold"),
  "generic_place": (
    "village",
    "valley",
    "small town by the sea",
    "farm at the edge of the forest",
    "island",
    "mountain village",
  ),
  "game": ("football", "tag", "hide and seek", "a game with a red ball", "jump rope"),
  "greeting": ("Good morning", "Hello", "Good afternoon", "Welcome", "How nice to see you"),
  "number": ("two", "three", "four", "five", "six"),
  "feeling": ("happy", "tired", "excited", "a little nervous", "calm", "proud"),
}


class _Slots(dict):
  """The format mapping of one sentence: fixed per-document slots, plus `_VOCAB` slots drawn at random.

  Numbered slots ("food2") draw from the same list as "food" but never repeat a word already used in the sentence.
  """

  def __init__(self, rng: random.Random, fixed: dict[str, str]):
    super().__init__(fixed)
    self.rng = rng

  def __missing__(self, key: str) -> str:
    base = key.rstrip("0123456789")
    used = {v for k, v in self.items() if k.rstrip("0123456789") == base}
    word = self.rng.choice([w for w in _VOCAB[base] if w not in used])
    self[key] = word
    return word


def _render(rng: random.Random, fixed: dict[str, str], template: str) -> str:
  return template.format_map(_Slots(rng, fixed))


def _person_slots(rng: random.Random) -> dict[str, str]:
  """A person living in some capital, and a second city for them to mention (every fact from `COUNTRIES`)."""
  name, pronoun = rng.choice(_NAMES)
  friend, _ = rng.choice([n for n in _NAMES if n[0] != name])
  home, other = rng.sample(COUNTRIES, 2)
  weather, weather_action = rng.choice(_WEATHER)
  return {
    "name": name,
    **_PRONOUNS[pronoun],
    "friend": friend,
    "city": home.capital,
    "country": home.name,
    "continent": home.continent,
    "language": home.language,
    "currency": home.currency,
    "other_city": other.capital,
    "other_country": other.name,
    "other_continent": other.continent,
    "other_language": other.language,
    "other_currency": other.currency,
    "weather": weather,
    "weather_action": weather_action,
  }


_DAY_OPENINGS = (
  "{name} lived in {city}, the capital of {country}.",
  "{name} was {a_job} in {city}.",
  "{name} worked as {a_job} in {city}, the capital of {country}.",
  "Every morning, {name} walked to the {place} in {city}.",
  "{name} grew up in a small village in {country}, but now {he} lived in {city}.",
  "Last {season}, {name} moved to {city} to work as {a_job}.",
)
# Listed in time order; a story keeps a random subset in this order.
_DAY_MIDDLES = (
  "{He} woke up early and made a cup of {drink}.",
  "The weather was {weather}, so {he} {weather_action}.",
  "The streets of {city} were {street_state}.",
  "At the {place}, {he} met {his} friend {friend}, who was {a_job}.",
  '"{greeting}, {name}," said {friend} with a smile.',
  "{friend} told {him} a funny story about {a_animal}.",
  "{He} and {friend} talked about {topic} for {duration}.",
  "{He} bought {food} and {food2} at the market.",
  "At the market, every price was written in the {currency}.",
  "{He} spoke {language} with the people at the {place}.",
  "After lunch, {he} {afternoon_activity}.",
  "In the afternoon, {he} read a book about {topic}.",
  "{He} wrote a letter to {his} {relative}, who lived in {other_city}.",
  "{His} {relative} called to ask how {he} was.",
  "{friend} asked {him} whether {he} wanted to visit {other_city} one day.",
  "{He} said that {he} would like to see {other_city}, the capital of {other_country}.",
  "Because {he} was tired, {he} sat on a bench and watched the people pass by.",
  "On the way home, {he} saw {a_animal} near the {place}.",
  "{He} cooked dinner with {food} and shared it with {his} family.",
)
_DAY_CLOSINGS = (
  "In the evening, {he} went home and {evening_activity}.",
  "That night, {he} slept well.",
  "It had been a long but good day.",
  "{He} smiled, because the day had been a good one.",
  "Before bed, {he} {evening_activity}.",
  "When the sun went down, {he} felt {feeling}.",
)


def _pick_in_order(rng: random.Random, items: list[str], low: int, high: int) -> list[str]:
  """A random subset of `low`..`high` items, kept in their original (time) order so that the story stays coherent."""
  indices = rng.sample(range(len(items)), min(len(items), rng.randint(low, high)))
  return [items[i] for i in sorted(indices)]


def _day_story(rng: random.Random) -> list[str]:
  fixed = _person_slots(rng)
  middles = _pick_in_order(rng, list(_DAY_MIDDLES), 1, 5)
  templates = [rng.choice(_DAY_OPENINGS), *middles, rng.choice(_DAY_CLOSINGS)]
  return [_render(rng, fixed, t) for t in templates]


def _travel_story(rng: random.Random) -> list[str]:
  fixed = _person_slots(rng)
  templates = [
    rng.choice(
      (
        "{name} decided to travel from {city} to {other_city}.",
        "One {season}, {name} left {city} for a trip to {other_country}.",
        "{name} had always wanted to visit {other_city}, the capital of {other_country}.",
      )
    ),
    "{He} took the {transport}, and the trip lasted {trip_duration}.",
  ]
  # Fly between continents; go overland or by boat within one.
  if fixed["continent"] == fixed["other_continent"]:
    fixed["transport"] = rng.choice(("train", "bus", "night train", "boat"))
  else:
    fixed["transport"] = "plane"
  # Language and money sentences depend on the facts, so they stay true.
  if fixed["other_language"] != fixed["language"]:
    language = "People there spoke {other_language}, so {he} learned a few new words."
  else:
    language = "Like at home, people there spoke {language}."
  optional = [
    "Through the window, {he} saw {landscape}.",
    "When {he} arrived in {other_city}, the weather was {weather}.",
    language,
    "{He} stayed in a small hotel near the {place}.",
    "On the first day, {he} visited the {place} and the {place2}.",
    "{He} bought {goods} as a gift for {his} {relative}.",
  ]
  if fixed["other_currency"] != fixed["currency"]:
    optional.insert(3, "{He} changed some money into the {other_currency}.")
  templates += _pick_in_order(rng, optional, 1, 4)
  templates.append(
    rng.choice(
      (
        "After {number} days, {he} returned home with many stories.",
        "{He} was sad to leave, but happy to see {city} again.",
        "Back in {city}, {he} told {friend} all about the trip.",
      )
    )
  )
  return [_render(rng, fixed, t) for t in templates]


def _market_scene(rng: random.Random) -> list[str]:
  fixed = _person_slots(rng)
  templates = ["The market in {city} opened early in the morning."]
  optional = [
    "Farmers brought {food}, {food2} and {food3} from the nearby villages.",
    "Traders from {other_country} sold {goods} and {goods2}.",
    "Most traders spoke {language}, and some knew a few words of {other_language}.",
    "An old woman sold {food} from a wooden cart.",
    "Everyone paid with the {currency}, the currency of {country}.",
    "A young {job} bought {goods} for the family shop.",
    "Children ran between the stalls, laughing and shouting.",
    "By noon, the market was crowded and noisy.",
  ]
  templates += _pick_in_order(rng, optional, 2, 5)
  templates.append(
    rng.choice(
      (
        "When the sun went down, the sellers packed their goods and went home.",
        "In the late afternoon, the streets around the market grew quiet again.",
      )
    )
  )
  return [_render(rng, fixed, t) for t in templates]


def _nature_scene(rng: random.Random) -> list[str]:
  # No real places here: general weather claims about real cities could be false.
  templates = [
    rng.choice(
      (
        "The {generic_place} was quiet in the early morning.",
        "One {season} morning, the {generic_place} was still asleep.",
      )
    )
  ]
  optional = [
    "A {adj_wind} wind blew from the {direction}.",
    "Birds sang in the tall trees, and a small river ran past the fields.",
    "The smell of fresh bread came from a house near the road.",
    "A fisher pulled a small boat onto the shore.",
    "Farmers worked in the fields, and children played near the water.",
    "By noon, the {sky_state}.",
    "Under an old tree, {a_animal} rested in the shade.",
  ]
  templates += _pick_in_order(rng, optional, 1, 5)
  templates.append("In the evening, the sky turned {color}, and the air became cool.")
  return [_render(rng, {}, t) for t in templates]


def _school_lesson(rng: random.Random) -> list[str]:
  fixed = _person_slots(rng)  # {name} is a pupil here
  # No "Mr." with a period: a period always ends a sentence in this corpus.
  teacher, teacher_pronoun = rng.choice((("Mr Costa", "he"), ("Mrs Okafor", "she")))
  named = rng.sample([c for c in COUNTRIES if c.continent == fixed["continent"]], 2)
  fixed |= {
    **_PRONOUNS[teacher_pronoun],  # {He}/{he} refer to the teacher
    "teacher": teacher,
    "named1": named[0].name,
    "named2": named[1].name,
    "named2_capital": named[1].capital,
  }
  templates = [
    "In a small school in {city}, {teacher} showed the children a map of the world.",
    "{He} pointed to {continent} and asked them to name a country there.",
    "The children named {named1} and {named2}.",
  ]
  optional = [
    "Then {he} told them that the capital of {named2} is {named2_capital}.",
    "{name} raised a hand and asked a question about {topic}.",
    "The class also practiced reading and writing in {language}.",
    "Everyone copied the names of the countries into their notebooks.",
  ]
  templates += _pick_in_order(rng, optional, 0, 3)
  templates.append("After the lesson, the children played {game} in the yard.")
  return [_render(rng, fixed, t) for t in templates]


def _letter(rng: random.Random) -> list[str]:
  fixed = _person_slots(rng)
  greeting = rng.choice(("Dear {friend},", "Dear Mother,", "Dear Father,", "Dear Grandmother,"))
  opening = rng.choice(("I am writing to you from {city}.", "I hope you are well."))
  templates = [f"{greeting} {opening}"]
  optional = [
    "The weather here has been {weather} all week.",
    "I have found work as {a_job}, and I like it very much.",
    "Last weekend I visited the {place} with some new friends.",
    "Everyone here speaks {language}, and I am learning quickly.",
    "Next month I hope to travel to {other_city}.",
    "I miss you and the rest of the family.",
    "The food is good, especially the {food}.",
  ]
  templates += _pick_in_order(rng, optional, 1, 5)
  templates.append(
    rng.choice(("Please write back soon. With love, {name}.", "I will write again soon. With love, {name}."))
  )
  return [_render(rng, fixed, t) for t in templates]


_PROSE_GENERATORS = (
  (_day_story, 4),
  (_travel_story, 2),
  (_market_scene, 2),
  (_nature_scene, 2),
  (_school_lesson, 1),
  (_letter, 1),
)


def _prose_document(rng: random.Random) -> str:
  generators, weights = zip(*_PROSE_GENERATORS)
  (generate,) = rng.choices(generators, weights=weights)
  return " ".join(generate(rng))


# ---------------------------------------------------------------------------
# Public corpus API
# ---------------------------------------------------------------------------

_PROSE_FRACTION = 0.35
# Every third time a country is the subject of a fact document, its capital is stated with the canonical SFT
# sentence, so each country gets it several times.
_CANONICAL_EVERY = 3


def pretraining_documents(seed: int = 0, num_documents: int = 4000) -> list[str]:
  """Generates single-paragraph English documents; deterministic: depends only on `seed` and `num_documents`.

  About 65 % are fact documents (several facts about one to three countries, in varied phrasings), the rest general
  prose. Fact documents cycle through all countries evenly, so with the default size every country is the subject
  of roughly 16 documents and its canonical sentence "The capital of X is Y." appears at least 5 times.

  Args:
    seed: Seeds the one `random.Random` every choice comes from.
    num_documents: How many documents (>= 0).

  Returns:
    The documents, each a single line.

  Raises:
    ValueError: `num_documents` is negative.
  """
  if num_documents < 0:
    raise ValueError(f"num_documents must be >= 0, got {num_documents}")
  rng = random.Random(seed)
  deck = _country_deck(rng)
  times_as_subject: dict[str, int] = {}
  documents = []
  for _ in range(num_documents):
    if rng.random() < _PROSE_FRACTION:
      documents.append(_prose_document(rng))
      continue
    main = next(deck)
    count = times_as_subject.get(main.name, 0)
    times_as_subject[main.name] = count + 1
    documents.append(_fact_document(rng, main, force_canonical=count % _CANONICAL_EVERY == 0))
  return documents


def write_pretraining_jsonl(path: str | os.PathLike[str], seed: int = 0, num_documents: int = 4000) -> str:
  """Writes `pretraining_documents(seed, num_documents)` as JSON Lines, one `{"text": doc}` a line.

  Parent directories are created. The file is written to a temporary file in the same directory and then moved
  into place, so readers never see a half-written corpus.

  Returns:
    `path`, as a string.
  """
  documents = pretraining_documents(seed=seed, num_documents=num_documents)
  return write_atomically(
    os.fspath(path), "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
  )
