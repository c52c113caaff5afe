"""Generate the bundled example data (synthetic, deterministic, pure Python, no network).

    python examples/data/make_data.py [--out DIR]     # default: this script's directory

Writes ``papers/{train,val,test}.jsonl`` (paper classification: title, abstract, label) and
``instruct/{alpaca,sharegpt}.jsonl`` (small instruction sets whose answers are computed here,
so they are correct). Running it again writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

SEED = 1234
PAPER_SPLITS = {"train": 3000, "val": 300, "test": 300}
NOISE = 0.05  # share of papers whose topic words come partly from another category

# ---- papers: per-category vocabularies ("|"-separated to keep the tables short) -----------
# Each category: field, topics, objects, methods, data sets, measures.
VOCAB = {
    "cs.CL": (
        "natural language processing",
        "machine translation|named entity recognition|question answering|text summarization|"
        "dependency parsing|sentiment analysis|language modeling|coreference resolution|"
        "dialogue systems|speech recognition|cross-lingual transfer|information extraction",
        "sentences|tokens|text corpora|documents|utterances|parallel text|word embeddings|"
        "transcripts|low-resource languages|syntactic trees",
        "subword tokenization|sequence-to-sequence models|pretrained language models|"
        "instruction tuning|beam search decoding|character-level encoders",
        "WMT|SQuAD|GLUE|CoNLL-2003|the Penn Treebank|XNLI",
        "BLEU|ROUGE|F1|exact match|perplexity|word error rate",
    ),
    "cs.CV": (
        "computer vision",
        "object detection|image segmentation|depth estimation|image generation|pose estimation|"
        "visual tracking|3D reconstruction|image super-resolution|scene understanding|"
        "optical flow|video recognition|novel view synthesis",
        "images|video frames|pixels|point clouds|bounding boxes|camera views|feature maps|"
        "image patches|object masks|stereo pairs",
        "convolutional networks|vision transformers|diffusion models|feature pyramids|"
        "data augmentation|neural radiance fields",
        "ImageNet|COCO|Cityscapes|KITTI|ADE20K|Kinetics",
        "mAP|mIoU|top-1 accuracy|PSNR|FID|endpoint error",
    ),
    "cs.LG": (
        "machine learning",
        "stochastic optimization|generalization|reinforcement learning|federated learning|"
        "graph neural networks|meta-learning|continual learning|Bayesian deep learning|"
        "representation learning|hyperparameter optimization|active learning|bandit problems",
        "gradients|loss landscapes|policies|reward signals|kernels|weight matrices|"
        "learning rates|training dynamics|latent representations|client updates",
        "stochastic gradient descent|variational inference|policy gradients|kernel methods|"
        "adaptive optimizers|weight decay",
        "MNIST|CIFAR-10|OpenML benchmarks|Atari games|MuJoCo tasks|synthetic regression tasks",
        "regret|test error|sample complexity|convergence rate|log-likelihood|calibration error",
    ),
    "q-bio": (
        "biology",
        "protein folding|gene regulation|cell differentiation|population genetics|neural coding|"
        "epidemic spread|metabolic networks|single-cell sequencing|evolutionary dynamics|"
        "drug response|immune signaling|microbial communities",
        "proteins|gene expression profiles|cells|neurons|tissue samples|genomes|enzymes|"
        "cell populations|mutations|regulatory networks",
        "phylogenetic analysis|RNA sequencing|molecular dynamics simulations|"
        "compartmental models|fluorescence microscopy|CRISPR screens",
        "the Protein Data Bank|The Cancer Genome Atlas|mouse cortex recordings|"
        "yeast knockout screens|zebrafish embryos|hospital surveillance records",
        "binding affinity|fitness|expression levels|survival rates|mutation rates|firing rates",
    ),
    "astro-ph": (
        "astrophysics",
        "galaxy formation|exoplanet detection|stellar evolution|dark matter halos|"
        "gravitational waves|the cosmic microwave background|supernova light curves|"
        "black hole accretion|star formation|cosmological parameters|solar flares|pulsar timing",
        "galaxies|stars|exoplanets|quasars|galaxy clusters|spectra|light curves|"
        "neutron stars|molecular clouds|white dwarfs",
        "N-body simulations|spectroscopic surveys|transit photometry|radio interferometry|"
        "gravitational lensing|hydrodynamical simulations",
        "Gaia|the Sloan Digital Sky Survey|Kepler|Planck|LIGO|the Hubble Space Telescope",
        "redshift|luminosity|metallicity|orbital period|the Hubble constant|stellar mass",
    ),
    "econ": (
        "economics",
        "labor markets|monetary policy|auction design|international trade|household consumption|"
        "minimum wage policy|inflation expectations|market competition|public finance|"
        "development economics|housing markets|financial regulation",
        "firms|households|workers|prices|wages|consumers|central banks|tariffs|"
        "interest rates|tax incentives",
        "difference-in-differences|instrumental variables|structural estimation|"
        "randomized field experiments|general equilibrium models|regression discontinuity",
        "census microdata|household surveys|administrative tax records|firm-level panel data|"
        "scanner data|central bank announcements",
        "welfare|elasticities|unemployment|productivity|GDP growth|inequality",
    ),
}
SHARED_ML = "neural networks|deep learning|transformers|self-supervised learning|machine learning"
ADJECTIVES = "scalable|robust|efficient|simple|unified|interpretable|data-driven|principled"
NOUNS = "framework|approach|method|model|analysis|estimator|pipeline|benchmark"

TITLES = (
    "{Method} for {topic}",
    "Towards {adj} {topic} with {method}",
    "On the role of {objects} in {topic}",
    "{Adj} {topic}: {a_noun} based on {method}",
    "Revisiting {topic} through {method}",
    "What {method} can reveal about {objects}",
    "{Topic} from {objects}: evidence from {dataset}",
)
SENTENCES = (
    (
        "{Topic} is a central problem in {field}.",
        "Understanding {objects} remains a challenge for {topic}.",
        "Recent work on {topic} relies heavily on {method}.",
        "Despite decades of progress, {topic} is still poorly understood.",
    ),
    (
        "We propose {a_adj_noun} that combines {method} with {method2}.",
        "In this paper we study {objects} using {method}.",
        "We introduce {a_noun} that models {objects} and {objects2} jointly.",
        "We revisit {method} and show how it applies to {topic2}.",
    ),
    (
        "Experiments on {dataset} show that our {noun} improves {measure} over strong baselines.",
        "Using {dataset}, we analyze {objects} and measure {measure}.",
        "On {dataset} we find a consistent relationship between {measure} and {objects2}.",
        "We evaluate on {dataset} and report {measure} and {measure2}.",
    ),
    (
        "Our results suggest that {objects} play a key role in {topic2}.",
        "We discuss implications for {topic2} and open questions.",
        "The {noun} is {adj} and easy to extend.",
        "Code and data are publicly available.",
    ),
)


def _words(spec: str) -> list[str]:
    return spec.split("|")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _slots(rng: random.Random, label: str) -> dict[str, str]:
    """Fill every template slot; NOISE of the examples draw topics from a second category."""
    other = rng.choice([c for c in VOCAB if c != label]) if rng.random() < NOISE else label

    def pick(kind: int, k: int = 1) -> list[str]:
        cat = other if rng.random() < 0.5 else label
        return rng.sample(_words(VOCAB[cat][kind]), k)

    topic, topic2 = pick(1, 2)
    objects, objects2 = pick(2, 2)
    methods = pick(3, 2)
    if label.startswith("cs.") or rng.random() < 0.15:  # ML vocabulary blurs the categories
        methods[rng.randrange(2)] = rng.choice(_words(SHARED_ML))
    measure, measure2 = pick(5, 2)
    adj, noun = rng.choice(_words(ADJECTIVES)), rng.choice(_words(NOUNS))
    slots = {
        "field": VOCAB[label][0],
        "topic": topic,
        "topic2": topic2,
        "objects": objects,
        "objects2": objects2,
        "method": methods[0],
        "method2": methods[1],
        "dataset": pick(4)[0],
        "measure": measure,
        "measure2": measure2,
        "adj": adj,
        "noun": noun,
        "a_noun": _a(noun),
        "a_adj_noun": _a(f"{adj} {noun}"),
    }
    return slots | {k.capitalize(): _cap(v) for k, v in slots.items() if k.islower()}


def paper_examples(rng: random.Random, n: int) -> list[dict[str, str]]:
    """``n`` synthetic papers: {"title", "abstract", "label"} with labels drawn uniformly."""
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(VOCAB))
        slots = _slots(rng, label)
        title = rng.choice(TITLES).format(**slots)
        abstract = " ".join(rng.choice(group).format(**slots) for group in SENTENCES)
        rows.append({"title": _cap(title), "abstract": abstract, "label": label})
    return rows


# ---- instructions: facts (checked by hand) and computed answers ---------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília",
    "Egypt": "Cairo", "India": "New Delhi", "Kenya": "Nairobi", "Mexico": "Mexico City",
    "Norway": "Oslo", "Portugal": "Lisbon", "Sweden": "Stockholm", "Argentina": "Buenos Aires",
    "China": "Beijing", "Greece": "Athens", "Poland": "Warsaw", "Peru": "Lima",
    "Thailand": "Bangkok", "South Korea": "Seoul", "the United Kingdom": "London",
}  # fmt: skip
# French: "la capitale <de + country>" and the city's French name.
CAPITALS_FR = {
    "de la France": "Paris", "de l'Allemagne": "Berlin", "de l'Italie": "Rome",
    "de l'Espagne": "Madrid", "du Japon": "Tokyo", "du Canada": "Ottawa",
    "du Portugal": "Lisbonne", "de la Grèce": "Athènes", "de la Pologne": "Varsovie",
}  # fmt: skip
CAPITALS_ZH = {
    "法国": "巴黎", "德国": "柏林", "意大利": "罗马", "西班牙": "马德里", "日本": "东京",
    "加拿大": "渥太华", "中国": "北京", "英国": "伦敦", "希腊": "雅典",
}  # fmt: skip
ELEMENTS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "sodium": "Na", "iron": "Fe", "gold": "Au", "silver": "Ag", "copper": "Cu",
    "potassium": "K", "calcium": "Ca", "lead": "Pb", "mercury": "Hg", "tin": "Sn",
}  # fmt: skip
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
# (from unit, to unit, factor): exact conversions only.
UNITS = (
    ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("liters", "milliliters", 1000),
    ("feet", "inches", 12), ("inches", "centimeters", Decimal("2.54")),
)  # fmt: skip
SENTENCES_TO_REWRITE = (
    "the quick brown fox jumps over the lazy dog",
    "fine tuning adapts a pretrained model to new data",
    "a small learning rate keeps training stable",
    "the library opens at nine in the morning",
    "rain is expected in the north this weekend",
    "she planted tomatoes and basil in the garden",
    "our team won the final match by two goals",
    "please send the report before friday",
)
FRUITS = _words("apple|banana|cherry|date|fig|grape|kiwi|lemon|mango|orange|pear|plum")
SYSTEMS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a careful assistant that double-checks every answer.",
    "You are a friendly tutor for students.",
)

Example = tuple[str, str, str]  # instruction, input, output


def _number(value: Decimal | int) -> str:
    text = f"{value:f}" if isinstance(value, Decimal) else str(value)
    return text.rstrip("0").rstrip(".") if "." in text else text


def arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, result = rng.choice((("+", a + b), ("-", a - b), ("×", a * b)))
    return f"What is {a} {op} {b}?", "", f"{a} {op} {b} = {result}."


def sum_numbers(rng: random.Random) -> Example:
    nums = [rng.randint(1, 50) for _ in range(rng.randint(3, 5))]
    shown = " + ".join(map(str, nums))
    return "Add up the numbers.", ", ".join(map(str, nums)), f"{shown} = {sum(nums)}."


def capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    question = f"What is the capital of {country}?"
    return question, "", f"The capital of {country} is {CAPITALS[country]}."


def element(rng: random.Random) -> Example:
    name = rng.choice(sorted(ELEMENTS))
    answer = f"The chemical symbol for {name} is {ELEMENTS[name]}."
    return f"What is the chemical symbol for {name}?", "", answer


def planet(rng: random.Random) -> Example:
    i = rng.randrange(len(PLANETS))
    question = f"Which planet is {ORDINALS[i]} from the Sun?"
    return question, "", f"{PLANETS[i]} is the {ORDINALS[i]} planet from the Sun."


def convert(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    if rng.random() < 0.3:
        c = rng.randrange(-40, 101, 5)
        return f"Convert {c} °C to Fahrenheit.", "", f"{c} °C is {c * 9 // 5 + 32} °F."
    return f"Convert {n} {src} to {dst}.", "", f"{n} {src} = {_number(n * factor)} {dst}."


def rewrite(rng: random.Random) -> Example:
    sentence = rng.choice(SENTENCES_TO_REWRITE)
    kind = rng.randrange(4)
    if kind == 0:
        return "Rewrite the sentence in uppercase.", sentence, sentence.upper()
    if kind == 1:
        return "Reverse the order of the words.", sentence, " ".join(sentence.split()[::-1])
    if kind == 2:
        count = len(sentence.split())
        return "Count the words in the sentence.", sentence, f"It has {count} words."
    words = rng.sample(FRUITS, rng.randint(3, 6))
    return "Sort these words alphabetically.", ", ".join(words), ", ".join(sorted(words))


def french(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS_FR))
        answer = f"La capitale {country} est {CAPITALS_FR[country]}."
        return f"Quelle est la capitale {country} ?", "", answer
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"Combien font {a} + {b} ?", "", f"{a} + {b} font {a + b}."


def chinese(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS_ZH))
        return f"{country}的首都是哪里？", "", f"{country}的首都是{CAPITALS_ZH[country]}。"
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"{a} 加 {b} 等于多少？", "", f"{a} 加 {b} 等于 {a + b}。"


MAKERS: tuple[Callable[[random.Random], Example], ...] = (
    arithmetic, sum_numbers, capital, element, planet, convert, rewrite, french, chinese,
)  # fmt: skip
SYSTEMS_FR = ("Tu es un assistant serviable.", "Réponds en une phrase.")
SYSTEMS_ZH = ("你是一个乐于助人的助手。", "请用一句话回答。")


def _follow_up(rng: random.Random) -> tuple[list[list[str]], str, str]:
    """A two-turn exchange for alpaca ``history``: (history, instruction, output)."""
    if rng.random() < 0.5:
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
        first = [f"What is {a} + {b}?", f"{a} + {b} = {a + b}."]
        return [first], f"Now multiply the result by {c}.", f"{a + b} × {c} = {(a + b) * c}."
    x, y = rng.sample(sorted(CAPITALS), 2)
    first = [f"What is the capital of {x}?", f"The capital of {x} is {CAPITALS[x]}."]
    return [first], f"And the capital of {y}?", f"The capital of {y} is {CAPITALS[y]}."


def alpaca_examples(rng: random.Random, n: int) -> list[dict]:
    """Alpaca rows; ~25% carry a system prompt, ~10% a ``history`` of earlier turns."""
    rows = []
    for _ in range(n):
        maker = rng.choice(MAKERS)
        row: dict = {}
        if rng.random() < 0.1:
            history, instruction, output = _follow_up(rng)
            row = {"instruction": instruction, "input": "", "output": output, "history": history}
        else:
            instruction, extra, output = maker(rng)
            row = {"instruction": instruction, "input": extra, "output": output}
        if rng.random() < 0.25:
            systems = {french: SYSTEMS_FR, chinese: SYSTEMS_ZH}.get(maker, SYSTEMS)
            row["system"] = rng.choice(systems) if "history" not in row else SYSTEMS[0]
        rows.append(row)
    return rows


def _chain_arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    a, b, c, d = (rng.randint(2, 60) for _ in range(4))
    s = a + b
    return [
        (f"What is {a} + {b}?", f"{a} + {b} = {s}."),
        (f"Multiply that by {c}.", f"{s} × {c} = {s * c}."),
        (f"Now subtract {d}.", f"{s * c} - {d} = {s * c - d}."),
    ]


def _chain_capitals(rng: random.Random) -> list[tuple[str, str]]:
    x, y = rng.sample(sorted(CAPITALS), 2)
    first = min(CAPITALS[x], CAPITALS[y], key=str.casefold)
    second = max(CAPITALS[x], CAPITALS[y], key=str.casefold)
    return [
        (f"What is the capital of {x}?", f"The capital of {x} is {CAPITALS[x]}."),
        (f"And the capital of {y}?", f"The capital of {y} is {CAPITALS[y]}."),
        ("Which of the two cities comes first alphabetically?", f"{first} comes before {second}."),
    ]


def _chain_units(rng: random.Random) -> list[tuple[str, str]]:
    n = rng.randint(2, 30)
    return [
        (f"Convert {n} km to meters.", f"{n} km = {n * 1000} m."),
        ("And to centimeters?", f"{n * 1000} m = {n * 100000} cm."),
    ]


def _chain_rewrite(rng: random.Random) -> list[tuple[str, str]]:
    sentence = rng.choice(SENTENCES_TO_REWRITE)
    upper = sentence.upper()
    return [
        (f"Make this sentence uppercase: {sentence}", upper),
        ("Now reverse the word order.", " ".join(upper.split()[::-1])),
    ]


def _chain_facts(rng: random.Random) -> list[tuple[str, str]]:
    return [maker(rng)[::2] for maker in rng.sample((capital, element, planet), 2)]


CHAINS = (_chain_arithmetic, _chain_capitals, _chain_units, _chain_rewrite, _chain_facts)


def sharegpt_examples(rng: random.Random, n: int) -> list[dict]:
    """ShareGPT rows with a system prompt: as a ``system`` column or as a first turn."""
    rows = []
    for _ in range(n):
        turns = []
        for question, answer in rng.choice(CHAINS)(rng):
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        system = rng.choice(SYSTEMS)
        if rng.random() < 0.5:
            rows.append({"system": system, "conversations": turns})
        else:
            rows.append({"conversations": [{"from": "system", "value": system}, *turns]})
    return rows


# ---- files --------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, ``\\n`` line ends (byte-identical on every OS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_all(out: Path) -> list[Path]:
    """Write every example file under ``out``; return their paths."""
    written = []
    rng = random.Random(SEED)
    for split, n in PAPER_SPLITS.items():
        written.append(out / "papers" / f"{split}.jsonl")
        write_jsonl(written[-1], paper_examples(rng, n))
    for name, make, n in (("alpaca", alpaca_examples, 300), ("sharegpt", sharegpt_examples, 200)):
        written.append(out / "instruct" / f"{name}.jsonl")
        write_jsonl(written[-1], make(random.Random(f"{SEED}:{name}"), n))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the bundled example data.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
