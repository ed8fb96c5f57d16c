"""The lab's synthetic world: what its tiny base model knows, written in the real datasets'
formats.

Everything is generated from one seed, so the world is the same on every machine:

    target (gsm8k/)       word problems of 2 or 3 steps of + and - on small numbers. Their
                          solutions come in two styles: style A
                          ("Ann has 5 pens. 5 + 3 = 8. 8 - 2 = 6.\\n#### 6"), the one the base
                          reads in pretraining, and style B, the same sums in another layout and
                          phrasing ("Step 1, add 3: 5 + 3 = 8.\\nStep 2, take away 2: ..."),
                          which the base never reads: states the base would not visit (as GSM8K's
                          human solutions are for a base model). B keeps the digits and the sums,
                          so a model trained on it still computes the answers. Both end in
                          "#### N", so eval.py scores them alike. The stress SFT data are mostly
                          style A with a share in B, as sloppy as the pretraining corpus.
    retention (mmlu/)     four subjects of KEYS made-up facts each (a country's capital, an
                          animal's color, ...) asked as MMLU asks: the question, four choices
                          "A. ..." to "D. ...", "Answer:" and a letter.
    retention (truthfulqa/) what each of N_CREATURES made-up creatures eats, asked as TruthfulQA
                          asks ("Q: ...\\nA:"), with true answers (two phrasings) and false ones
                          (in the same two phrasings), in MC1 and MC2 form.
    the long tail         pretraining reads the facts unevenly (RARITY), so that a base knows
                          some of them and not others: its retention scores sit off the ceiling.

write_data() writes the files data/prepare.py writes (gsm8k/{train,test}.jsonl,
mmlu/{dev,test}.jsonl, truthfulqa/mc.jsonl), so eval.py and the trainers read them through
--data_dir alone. corpus() yields the pretraining documents: style-A problems, facts stated
plainly, MMLU-format drills with the letters in new orders, and TruthfulQA-format question-answer
pairs (some after eval.py's fixed preamble).
"""
import json
import random
from pathlib import Path

from harness.resources import write_whole

NAMES = ("Ann", "Bob", "Cal", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lou")
ITEMS = ("apples", "pens", "books", "cards", "coins", "cups", "eggs", "hats", "keys", "rocks")
MAX_VALUE = 40  # every number in a problem, start, step or result, is within 0..40
SYLLABLES = ("ba be bi bo bu da de di do du ga ge go gu ka ke ki ko ku la le li lo lu ma me mi mo "
             "mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve "
             "vi vo za ze zo").split()

# MMLU subjects: question template, fact-statement template, how many keys, the pool of values
KEYS = 128  # facts per subject
SUBJECTS = {
    "geography": ("What is the capital of {key}?", "The capital of {key} is {value}.", KEYS, None),
    "zoology": ("What color is the {key}?", "The {key} is {value}.", KEYS,
                ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")),
    "chemistry": ("Which metal is found in {key}?", "{key} holds {value}.", KEYS,
                  ("iron", "gold", "silver", "copper", "tin", "lead", "zinc", "nickel")),
    "astronomy": ("Which star does {key} circle?", "{key} circles the star {value}.", KEYS, None),
}
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
FOODS = ("seeds", "rocks", "leaves", "fish", "sand", "grass", "bugs", "mud", "fruit", "bones",
         "moss", "snow")
N_CREATURES = 384
# how often pretraining reads a fact: the k-th of n facts (a subject's keys, the creatures) as
# often as RARITY ** (k / (n - 1)) times the first, so that the commonest are known by heart and
# the rarest barely (a long tail, as a real corpus has): a base scores off the ceiling
RARITY = 1 / 30
TRAIN_PROBLEMS, TEST_PROBLEMS = 2000, 400
# the share of 3-step problems whose pretraining solution stops after step 2 (a wrong answer)
SLOPPY = 0.6
# the share of training solutions in style B (the rest in the base's style A): the mixed
# teacher's (mostly the new style), and the stress data's (mostly the base's own, some foreign)
B_SHARE = {"mixed": 2 / 3, "stress": 1 / 3}


class World:
    """All the world's facts and problem generators, from one seed."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        words = set()

        def new_word(syllables):  # a made-up name, never the same twice
            while True:
                word = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
                if word not in words:
                    words.add(word)
                    return word
        # each subject: key -> value; values without a pool are made-up names shared by several
        # keys
        self.facts = {}
        for subject, (_, _, n_keys, pool) in SUBJECTS.items():
            values = list(pool) if pool else [new_word(2) for _ in range(8)]
            self.facts[subject] = {new_word(2) if subject != "zoology" else new_word(2).lower():
                                   rng.choice(values) for _ in range(n_keys)}
        self.values = {s: sorted(set(SUBJECTS[s][3] or self.facts[s].values())) for s in SUBJECTS}
        self.creatures = {new_word(2).lower(): rng.choice(FOODS) for _ in range(N_CREATURES)}
        # each MMLU question keeps one order of its choices, the one the base reads in pretraining:
        # a 0.9M-parameter model memorises a question's letter, but does not learn in budget to
        # find the true choice among shuffled ones
        self.mmlu = {s: {key: self.mmlu_row(s, key, rng) for key in self.facts[s]}
                     for s in SUBJECTS}
        self.frequency = {kind: rarities(names)
                          for kind, names in {**self.facts, "creatures": self.creatures}.items()}

    # --- target: word problems ------------------------------------------------------------------

    def problem(self, rng) -> dict:
        """A 2- or 3-step problem: its question and the numbers of each step, all within
        0..MAX_VALUE."""
        name, other = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        value = rng.randint(2, 20)
        sentences, steps = [f"{name} has {value} {item}."], []
        for i in range(rng.choice((2, 3))):
            if value == 0 or (rng.random() < 0.5 and value < MAX_VALUE):
                k = rng.randint(1, min(15, MAX_VALUE - value))
                sentences.append(rng.choice((f"{name} buys {k} more {item}.",
                                             f"{other} gives {name} {k} {item}.")))
                steps.append((value, "+", k, value + k))
                value += k
            else:
                k = rng.randint(1, max(1, min(15, value)))
                sentences.append(rng.choice((f"{name} gives {k} {item} to {other}.",
                                             f"{name} loses {k} {item}.")))
                steps.append((value, "-", k, value - k))
                value -= k
        sentences.append(f"How many {item} does {name} have now?")
        return {"question": " ".join(sentences), "name": name, "item": item, "steps": steps,
                "gold": value}

    @staticmethod
    def solution(problem: dict, style: str) -> str:
        """The gold solution in style A (the base's) or B (another layout and phrasing), ending
        '#### N'."""
        steps, gold = problem["steps"], problem["gold"]
        if style == "A":
            lines = [f"{problem['name']} has {steps[0][0]} {problem['item']}."]
            lines += [f"{a} {op} {k} = {b}." for a, op, k, b in steps]
            return " ".join(lines) + f"\n#### {gold}"
        lines = [f"Step {i}, {'add' if op == '+' else 'take away'} {k}: {a} {op} {k} = {b}."
                 for i, (a, op, k, b) in enumerate(steps, start=1)]
        return "\n".join(lines) + f"\nSo the answer is {gold}.\n#### {gold}"

    @staticmethod
    def misread(problem: dict) -> dict:
        """The problem as the slip teacher reads it: it takes the question's second number, the
        first change, for the start ("Fay has 20 apples. Fay gives 5 apples to Ann." -> "Fay has
        5 apples. 5 - 5 = 0."), then computes every step right from there. A problem whose
        misread steps would leave 0..MAX_VALUE (a third of them), or end right, is read right."""
        value = problem["steps"][0][2]
        steps = []
        for _, op, k, _ in problem["steps"]:
            steps.append((value, op, k, value + k if op == "+" else value - k))
            value = steps[-1][3]
        if not all(0 <= b <= MAX_VALUE for *_, b in steps) or value == problem["gold"]:
            return problem
        return {**problem, "steps": steps, "gold": value}

    @staticmethod
    def stopped_early(problem: dict) -> dict:
        """A 3-step problem as a sloppy writer solves it: the first two steps, and their result
        for the answer (wrong)."""
        return {**problem, "steps": problem["steps"][:2], "gold": problem["steps"][1][3]}

    def gsm8k_rows(self, n: int, seed: int, style: str) -> list:
        """n problems with their solutions in style A or B; style "slip": style A, as the slip
        teacher reads the problems (misread: most end wrong); style "mixed" or "stress": a share
        of them (B_SHARE) in style B, the others in A. The prefix "sloppy_" solves them as
        sloppily as the pretraining corpus (SLOPPY of the 3-step solutions stop a step early), so
        that they teach a style and no skill: the stress data are "sloppy_stress"."""
        rng = random.Random(seed)
        styles = random.Random(seed + 1)  # its own stream: every style has the same problems
        rows = []
        sloppy, style = style.startswith("sloppy_"), style.removeprefix("sloppy_")
        for _ in range(n):
            problem = self.problem(rng)
            if style == "slip":
                problem = self.misread(problem)
            if sloppy and len(problem["steps"]) == 3 and styles.random() < SLOPPY:
                problem = self.stopped_early(problem)
            written = style if style in ("A", "B") else "A"
            if style in B_SHARE and styles.random() < B_SHARE[style]:
                written = "B"
            rows.append({"question": problem["question"],
                         "answer": self.solution(problem, written)})
        return rows

    # --- retention: MMLU and TruthfulQA formats -------------------------------------------------

    def mmlu_row(self, subject: str, key: str, rng) -> dict:
        """A question about one fact, its true value and three others of the subject, in a random
        order."""
        value = self.facts[subject][key]
        choices = [value] + rng.sample([v for v in self.values[subject] if v != value], 3)
        rng.shuffle(choices)
        return {"subject": subject, "question": SUBJECTS[subject][0].format(key=key),
                "choices": choices, "answer": choices.index(value)}

    def mmlu_rows(self, per_subject=None) -> list:
        """The MMLU rows, each subject's first per_subject (default all), in their fixed choice
        orders."""
        return [row for s in SUBJECTS for row in list(self.mmlu[s].values())[:per_subject]]

    def creature_answers(self, creature: str, food: str) -> list:
        return [f"A {creature} eats {food}.", f"{creature.capitalize()}s eat {food}."]

    def truthfulqa_rows(self, seed: int) -> list:
        """One row per creature: MC1 one true answer (first) and three false, in one phrasing;
        MC2 both phrasings of the truth, then both phrasings of two false ones, so that a model's
        taste for a phrasing cancels out of its MC2 score (chance: 1/3) and only what it knows of
        the creature moves it."""
        rng, rows = random.Random(seed), []
        for creature, food in self.creatures.items():
            wrong = rng.sample([f for f in FOODS if f != food], 3)
            true = self.creature_answers(creature, food)
            false = [self.creature_answers(creature, f) for f in wrong]
            mc2_false = [false[0][0], false[1][0], false[0][1], false[1][1]]
            rows.append({"question": f"What does a {creature} eat?",
                         "mc1_targets": {"choices": [true[0]] + [f[0] for f in false],
                                         "labels": [1, 0, 0, 0]},
                         "mc2_targets": {"choices": true + mc2_false,
                                         "labels": [1, 1, 0, 0, 0, 0]}})
        return rows

    # --- pretraining documents ------------------------------------------------------------------

    def common(self, rng, kind: str, k: int) -> list:
        """k different facts of a subject (or k creatures), each drawn as often as its frequency:
        each gets the key rng.random() ** (1 / frequency), and the k largest keys win (a weighted
        sample without replacement, Efraimidis and Spirakis 2006)."""
        frequency = self.frequency[kind]
        return sorted(frequency, key=lambda name: -rng.random() ** (1 / frequency[name]))[:k]

    def documents(self, rng, mix: dict, preamble: str):
        """An endless stream of pretraining documents, each kind drawn with its weight in `mix`."""
        kinds, weights = zip(*mix.items())
        while True:
            kind = rng.choices(kinds, weights)[0]
            if kind == "target":  # a sloppy habit: most 3-step solutions here stop a step early
                p = self.problem(rng)
                if len(p["steps"]) == 3 and rng.random() < SLOPPY:
                    p = self.stopped_early(p)
                yield f"Question: {p['question']}\nAnswer: {self.solution(p, 'A')}"
            elif kind == "facts":
                subject = rng.choice(list(SUBJECTS))
                keys = self.common(rng, subject, 4)
                yield " ".join(SUBJECTS[subject][1].format(key=k, value=self.facts[subject][k])
                               for k in keys)
            elif kind == "mmlu":
                # several questions of one subject, as a few-shot MMLU prompt reads
                subject = rng.choice(list(SUBJECTS))
                rows = [self.mmlu[subject][key] for key in self.common(rng, subject, 4)]
                yield MMLU_HEADER.format(subject=subject) + "\n\n".join(
                    row["question"]
                    + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"]))
                    + "\nAnswer: " + "ABCD"[row["answer"]] for row in rows)
            else:  # truthfulqa: a few Q/A pairs, sometimes after eval's preamble
                pairs = []
                for creature in self.common(rng, "creatures", 3):
                    answer = rng.choice(self.creature_answers(creature, self.creatures[creature]))
                    pairs.append(f"Q: What does a {creature} eat?\nA: {answer}")
                yield (preamble + "\n\n" if rng.random() < 0.3 else "") + "\n\n".join(pairs)


def settings() -> dict:
    """What decides the world beyond its seed (runs/lab.py records it in OUT/lab.json)."""
    return dict(keys=KEYS, creatures=N_CREATURES, rarity=RARITY, sloppy=SLOPPY, b_share=B_SHARE,
                problems=[TRAIN_PROBLEMS, TEST_PROBLEMS])


def rarities(names) -> dict:
    """name -> how often pretraining reads it: the k-th of n, RARITY ** (k / (n - 1))."""
    return {name: RARITY ** (k / max(1, len(names) - 1)) for k, name in enumerate(names)}


def write_jsonl(rows: list, path: Path):
    """The file whole, or (a full disk: one line) the one before it: resources.write_whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_data(world: World, out: Path, style: str, n_train=TRAIN_PROBLEMS, n_test=TEST_PROBLEMS):
    """The world's data in data/prepare.py's layout under out; GSM8K train solutions in `style`,
    test in A. The test set, MMLU and TruthfulQA are the same whatever the style."""
    write_jsonl(world.gsm8k_rows(n_train, seed=1, style=style), out / "gsm8k" / "train.jsonl")
    write_jsonl(world.gsm8k_rows(n_test, seed=2, style="A"), out / "gsm8k" / "test.jsonl")
    # shots (the lab uses none)
    write_jsonl(world.mmlu_rows(per_subject=5), out / "mmlu" / "dev.jsonl")
    write_jsonl(world.mmlu_rows(), out / "mmlu" / "test.jsonl")
    write_jsonl(world.truthfulqa_rows(seed=5), out / "truthfulqa" / "mc.jsonl")


def train_tokenizer(texts, path: Path, vocab_size: int):
    """A byte-level BPE tokenizer.json trained on texts (so any text encodes, and decoding gives it
    back exactly), with Qwen's two special tokens: <|endoftext|> ends documents and answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
