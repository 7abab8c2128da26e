"""Bundled demo data, generated deterministically (Chinese and English), written by the project.

Run as: ``python -m lorafleet.datagen OUT_DIR [--seed N]``

Files written by :func:`generate_datasets`:

- ``cblue_train.jsonl`` / ``cblue_validation.jsonl``: a PromptCBLUE-style task in the CHIP-CTC
  manner: classify a clinical-trial eligibility criterion into one of eight categories. Columns
  format: ``input`` (instruction, sentence, options, ``答：``) and ``target`` (the category). Sentences
  are built from per-category phrase banks plus shared filler, so the keywords decide the class;
  no validation sentence appears in the training file.
- ``alpaca_train.jsonl``: single-turn instructions (arithmetic, unit conversion, word translation,
  capital cities), some with ``input`` and ``system``.
- ``messages_train.jsonl``: 2-3 turn OpenAI ``messages`` conversations on the same topics.
- ``corpus.txt``: every text above plus general sentences, for training the tiny tokenizer and
  briefly pre-training the tiny model.

Every answer is computable, so generation metrics can be checked exactly. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any


def _split(text: str) -> list[str]:
    """Phrase banks are written as "a|b|c" to stay compact."""
    return text.split("|")


CATEGORIES = ["疾病", "年龄", "过敏耐受", "治疗或手术", "实验室检查", "知情同意", "妊娠相关", "药物"]
"""CHIP-CTC-style labels (Disease, Age, Allergy, Therapy or Surgery, Laboratory, Consent,
Pregnancy, Drug)."""

_DISEASES = _split(
    "2型糖尿病|高血压|冠心病|慢性阻塞性肺疾病|非小细胞肺癌|乳腺癌|肝硬化|类风湿关节炎|慢性肾病|脑卒中|哮喘|乙型肝炎|帕金森病|"
    "系统性红斑狼疮"
)
_DISEASES_EN = _split(
    "type 2 diabetes|hypertension|coronary heart disease|COPD|"
    "breast cancer|asthma|chronic kidney disease|rheumatoid arthritis"
)
_DRUGS = _split("华法林|阿司匹林|糖皮质激素|二甲双胍|氯吡格雷|胰岛素|他汀类药物|青霉素|头孢菌素|磺胺类药物")
_DRUGS_EN = ["warfarin", "aspirin", "metformin", "insulin", "penicillin", "clopidogrel", "statins"]
_SURGERIES = _split("冠状动脉旁路移植术|经皮冠状动脉介入治疗|肝移植|胃切除术|髋关节置换术|心脏瓣膜置换术")
_THERAPIES = ["放疗", "化疗", "免疫治疗", "血液透析", "靶向治疗", "干细胞移植"]
_THERAPIES_EN = ["radiotherapy", "chemotherapy", "immunotherapy", "dialysis", "major surgery"]

# Per category: templates with {slots}; the category is decided by the words outside the slots.
_BANKS: dict[str, list[str]] = {
    "疾病": _split(
        "经病理确诊为{disease}|既往有{disease}病史|合并严重的{disease}|临床诊断为{disease}的患者|"
        "患有未控制的{disease}|Diagnosed with {disease_en}|History of {disease_en}"
    ),
    "年龄": _split(
        "年龄{a}~{b}岁|年龄≥{a}周岁|年龄在{a}至{b}岁之间的男性或女性|年龄小于{a}岁的儿童|"
        "Aged {a} to {b} years|Age over {b} years"
    ),
    "过敏耐受": _split(
        "对{drug}过敏|已知对研究药物或其辅料过敏|有{drug}过敏史|对造影剂不能耐受|对{drug}不耐受|"
        "Known hypersensitivity to {drug_en}|Allergy to {drug_en}"
    ),
    "治疗或手术": _split(
        "入组前{n}个月内接受过{surgery}|既往接受过{therapy}|计划在研究期间进行{surgery}|正在接受{therapy}|"
        "Prior {therapy_en} within {n} weeks|Scheduled for {therapy_en}"
    ),
    "实验室检查": _split(
        "血红蛋白<{x}g/L|谷丙转氨酶高于正常上限{k}倍|血肌酐>{x}μmol/L|血小板计数<{x}×10^9/L|"
        "中性粒细胞绝对计数≥{k}×10^9/L|HbA1c between {k}% and {y}%|"
        "Serum creatinine above {x} umol/L"
    ),
    "知情同意": _split(
        "自愿参加本研究并签署知情同意书|患者或其法定代理人签署知情同意书|能够理解并签署知情同意书|同意参加随访并签署知情同意书|"
        "Able to provide written informed consent|"
        "Willing to sign the informed consent form"
    ),
    "妊娠相关": _split(
        "妊娠期或哺乳期妇女|育龄期女性血妊娠试验阳性|研究期间计划怀孕|不愿在研究期间采取有效避孕措施|"
        "Pregnant or breastfeeding women|Positive pregnancy test at screening"
    ),
    "药物": _split(
        "正在服用{drug}|入组前{n}周内使用过{drug}|需要长期使用{drug}|筛选前{n}天内服用过{drug}|"
        "Current use of {drug_en}|Taking {drug_en} within {n} days"
    ),
}
_LEADS = _split("||1. |2. |（1）|受试者|排除标准：|入选标准：|· |Exclusion: |Inclusion: ")
_TAILS = _split("||。|；|者。|（研究者判断）|。")
_CBLUE_INSTRUCTIONS = [
    "判断临床试验筛选标准的类型：\n{sentence}\n选项：{options}\n答：",
    "请判断下面这条临床试验筛选标准属于哪一类：\n{sentence}\n选项：{options}\n答：",
    "临床试验筛选标准分类：\n{sentence}\n类型选项：{options}\n答：",
    "Classify the clinical trial eligibility criterion:\n{sentence}\n选项：{options}\n答：",
]

_WORDS = [
    (en, zh)
    for en, zh in (
        pair.split(":")
        for pair in _split(
            "apple:苹果|water:水|book:书|cat:猫|dog:狗|sun:太阳|moon:月亮|tree:树|flower:花|rice:米饭|tea:茶|"
            "river:河|mountain:山|friend:朋友|school:学校|doctor:医生|hospital:医院|bird:鸟|fish:鱼|car:汽车"
        )
    )
]
_CAPITALS = [
    (country, country_zh, city, city_zh)
    for country, country_zh, city, city_zh in (
        row.split(":")
        for row in _split(
            "France:法国:Paris:巴黎|Japan:日本:Tokyo:东京|China:中国:Beijing:北京|Germany:德国:Berlin:柏林|"
            "Italy:意大利:Rome:罗马|Spain:西班牙:Madrid:马德里|Egypt:埃及:Cairo:开罗|Canada:加拿大:Ottawa:渥太华|"
            "Russia:俄罗斯:Moscow:莫斯科|Thailand:泰国:Bangkok:曼谷|Korea:韩国:Seoul:首尔|India:印度:New Delhi:新德里"
        )
    )
]
_SYSTEMS = [
    "你是一个乐于助人的助手。",
    "You are a concise assistant. Answer with the result only.",
    "你是一名严谨的数学老师，只给出答案。",
]

_GENERAL = """\
The weather is mild today, and many people are walking in the park.
Learning a new language takes patience, practice and curiosity.
A good doctor listens carefully before making a diagnosis.
The library opens at nine in the morning and closes at six in the evening.
Small models can be trained quickly on a laptop for testing.
Clinical trials test whether a new treatment is safe and effective.
Please read the instructions carefully before you answer the question.
The train to the city leaves every thirty minutes.
Fresh vegetables and fruit are part of a healthy diet.
She wrote a short letter to her friend who lives abroad.
Numbers can be added, subtracted, multiplied and divided.
The river flows from the mountains to the sea.
今天天气晴朗，公园里有很多人在散步。
学习一门新的语言需要耐心和练习。
医生在做出诊断之前会仔细询问病史。
图书馆早上九点开门，晚上六点关门。
临床试验用于评估新疗法的安全性和有效性。
请先仔细阅读说明，然后回答问题。
去城里的火车每三十分钟一班。
新鲜的蔬菜和水果是健康饮食的一部分。
她给住在国外的朋友写了一封短信。
数字可以相加、相减、相乘和相除。
河流从山上流向大海。
研究者将根据受试者的情况判断是否符合入组条件。
患者在入组前需要完成血常规和肝肾功能检查。
本研究计划招募二百名受试者，随访时间为十二个月。
Human: Assistant: System: ### Instruction: ### Response: Belle: [INST] [/INST] <<SYS>> <</SYS>>
[Round 1] [Round 2] [Round 3] 问： 答： system user assistant
"""


def _fill(rng: random.Random, template: str) -> str:
    a = rng.randint(16, 45)
    values = {
        "disease": rng.choice(_DISEASES),
        "disease_en": rng.choice(_DISEASES_EN),
        "drug": rng.choice(_DRUGS),
        "drug_en": rng.choice(_DRUGS_EN),
        "surgery": rng.choice(_SURGERIES),
        "therapy": rng.choice(_THERAPIES),
        "therapy_en": rng.choice(_THERAPIES_EN),
        "a": str(a),
        "b": str(a + rng.randint(10, 40)),
        "n": str(rng.randint(1, 12)),
        "x": str(rng.randint(5, 30) * 10),
        "k": str(rng.randint(2, 5)),
        "y": str(rng.randint(6, 10)),
    }
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def _cblue(rng: random.Random, per_class_train: int = 100, per_class_val: int = 10) -> tuple[list, list]:
    """Balanced CHIP-CTC-style rows; validation sentences are never in train."""
    options = "，".join(CATEGORIES)
    seen: set[str] = set()
    train: list[dict[str, str]] = []
    validation: list[dict[str, str]] = []
    for category in CATEGORIES:
        sentences: list[str] = []
        while len(sentences) < per_class_train + per_class_val:
            core = _fill(rng, rng.choice(_BANKS[category]))
            sentence = rng.choice(_LEADS) + core + rng.choice(_TAILS)
            if sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
        for i, sentence in enumerate(sentences):
            prompt = (
                rng.choice(_CBLUE_INSTRUCTIONS).replace("{sentence}", sentence).replace("{options}", options)
            )
            row = {"input": prompt, "target": category}
            (train if i < per_class_train else validation).append(row)
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) with a checkable answer."""
    kind = rng.randrange(8)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == 0:
        return f"计算 {a} + {b} 等于多少？", "", str(a + b)
    if kind == 1:
        return f"What is {a} plus {b}?", "", str(a + b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return rng.choice([f"计算 {a} × {b}。", f"What is {a} times {b}?"]), "", str(a * b)
    if kind == 3:
        x = rng.randint(1, 50)
        return rng.choice(
            [
                (f"{x} 公里等于多少米？", "", f"{x * 1000} 米"),
                (f"Convert {x} kilograms to grams.", "", f"{x * 1000} grams"),
                (f"{x} 小时等于多少分钟？", "", f"{x * 60} 分钟"),
            ]
        )
    if kind in (4, 5):
        en, zh = rng.choice(_WORDS)
        if kind == 4:
            return rng.choice(
                [("把下面的英文单词翻译成中文。", en, zh), (f"Translate '{en}' into Chinese.", "", zh)]
            )
        return rng.choice(
            [
                ("Translate the following Chinese word into English.", zh, en),
                (f"“{zh}”的英文是什么？", "", en),
            ]
        )
    country, country_zh, city, city_zh = rng.choice(_CAPITALS)
    if kind == 6:
        return f"What is the capital of {country}?", "", city
    return f"{country_zh}的首都是哪里？", "", city_zh


def _alpaca(rng: random.Random, count: int = 200) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while len(rows) < count:
        instruction, extra, output = _task(rng)
        if (instruction, extra) in seen:
            continue
        seen.add((instruction, extra))
        row = {"instruction": instruction, "input": extra, "output": output}
        if rng.random() < 0.2:
            row["system"] = rng.choice(_SYSTEMS)
        rows.append(row)
    return rows


def _conversation(rng: random.Random) -> list[tuple[str, str]]:
    """2-3 turns whose follow-ups depend on the earlier answers."""
    kind = rng.randrange(3)
    turns = rng.randint(2, 3)
    if kind == 0:
        total = rng.randint(2, 50)
        b = rng.randint(2, 50)
        pairs = [(rng.choice([f"计算 {total} + {b}。", f"What is {total} plus {b}?"]), str(total + b))]
        total += b
        for _ in range(turns - 1):
            if rng.random() < 0.5:
                m = rng.randint(2, 5)
                total *= m
                pairs.append((rng.choice([f"再乘以 {m} 呢？", f"And times {m}?"]), str(total)))
            else:
                s = rng.randint(1, 20)
                total -= s
                pairs.append((rng.choice([f"再减去 {s} 呢？", f"And minus {s}?"]), str(total)))
        return pairs
    if kind == 1:
        words = rng.sample(_WORDS, turns)
        first = (f"Translate '{words[0][0]}' into Chinese.", words[0][1])
        return [first] + [(rng.choice([f"And '{en}'?", f"那 “{en}” 呢？"]), zh) for en, zh in words[1:]]
    country, _, city, city_zh = rng.choice(_CAPITALS)
    pairs = [(f"What is the capital of {country}?", city), ("用中文怎么说？", city_zh)]
    if turns == 3:
        other = rng.choice(_CAPITALS)
        pairs.append((f"那{other[1]}呢？", other[3]))
    return pairs


def _messages(rng: random.Random, count: int = 100) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < count:
        pairs = _conversation(rng)
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        for query, answer in pairs:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        key = json.dumps(messages, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
    return rows


def _build(seed: int) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    train, validation = _cblue(rng)
    return {
        "cblue_train": train,
        "cblue_validation": validation,
        "alpaca_train": _alpaca(rng),
        "messages_train": _messages(rng),
    }


def _corpus(tables: dict[str, list[dict[str, Any]]]) -> str:
    lines: list[str] = []
    for rows in tables.values():
        for row in rows:
            if "messages" in row:
                lines += [m["content"] for m in row["messages"]]
            else:
                lines += [str(v) for v in row.values() if v]
    return "\n".join(lines) + "\n" + _GENERAL


def corpus_text(seed: int = 0) -> str:
    """The text of ``corpus.txt`` for this seed, without writing any file."""
    return _corpus(_build(seed))


def generate_datasets(out_dir: str, seed: int = 0) -> dict[str, Path]:
    """Write the bundled datasets and corpus into ``out_dir``.

    Args:
        out_dir: Created if missing; existing files of the same names are replaced.
        seed: Same seed, byte-identical files.

    Returns:
        Name (``cblue_train``, ``cblue_validation``, ``alpaca_train``, ``messages_train``, ``corpus``)
        to the written path.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tables = _build(seed)
    paths: dict[str, Path] = {}
    for name, rows in tables.items():
        path = root / f"{name}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8", newline="\n")
        paths[name] = path
    corpus = root / "corpus.txt"
    corpus.write_text(_corpus(tables), encoding="utf-8", newline="\n")
    paths["corpus"] = corpus
    return paths


_TAG_DIGITS = {"P": "3", "Q": "7", "R": "7", "S": "3", "T": "3", "U": "7"}
"""The preference task's rule: the check digit after each tag letter (all single tokens). The
mapping is arbitrary on purpose: a base model cannot know it (A1/B2 would not do: "HbA1c" is in the
corpus, and the tiny base ranked 94 % of such pairs right before any training)."""
_TAG_ASKS = (
    "Tag your answer with {tag}",
    "Label the reply {tag}",
    "请用标签 {tag} 标注回答",
)
_ASKERS = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "小明", "小红")


def _tagged_pair(rng: random.Random, task: tuple[str, str, str], tag: str) -> dict[str, str]:
    """A pair that answers a bundled question with the same correct result, tagged ``tag`` plus its
    check digit (chosen) or the other digit (rejected)."""
    instruction, extra, output = task
    right = _TAG_DIGITS[tag]
    wrong = sorted(set(_TAG_DIGITS.values()) - {right})[0]
    question = instruction + (f" {extra}" if extra else "")
    ask = rng.choice(_TAG_ASKS).format(tag=tag)
    return {
        "prompt": f"{rng.choice(_ASKERS)}: {question} {ask}",
        "chosen": f"{tag}{right}: {output}",
        "rejected": f"{tag}{wrong}: {output}",
    }


def preference_tables(
    seed: int = 0, pairs: int = 500, validation_fraction: float = 0.2
) -> dict[str, list[dict[str, Any]]]:
    """The bundled preference task: answers tagged with the asked letter and its check digit.

    Each prompt is a bundled question (arithmetic, unit conversion, translation, capitals; see
    ``_task``) and an instruction to tag the answer with a letter (English or Chinese phrasing).
    Both answers carry the same correct result after the tag; the chosen one writes the tag with its
    check digit (``_TAG_DIGITS``: P3, Q7, R7, S3, T3, U7), the rejected one with the other digit.
    The rule is checkable (``chosen`` starts with tag + check digit) and lives in the surface form:
    the digit depends only on the token just before it, which even a 2-layer model learns in a few
    dozen steps (rules that need a look-up across the prompt, such as the parity of a number or
    copying the asked letter, were not learned by the tiny llama within a minute of CPU). It is
    balanced: each digit is the right one for half the rows, and the mapping was picked so that
    the tiny base model's own letter-digit habits rank about half the held-out pairs right (50 %
    with the default seed); only a model that learned the rule ranks them all. The two answers
    differ in that one token, so the ranking is about the rule, not length. No held-out prompt is in
    the training rows. ``kto_train`` holds one unpaired row per training pair: its chosen answer
    (desirable) or its rejected one (undesirable), alternating.

    Returns:
        ``preference_train``, ``preference_validation`` (pairwise rows) and ``kto_train``.
    """
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < pairs:
        tags = sorted(_TAG_DIGITS)
        row = _tagged_pair(rng, _task(rng), tags[len(rows) % len(tags)])
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    rng.shuffle(rows)
    held_out = int(len(rows) * validation_fraction)
    train, validation = rows[held_out:], rows[:held_out]
    kto = [
        {
            "prompt": p["prompt"],
            "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
            "label": i % 2 == 0,
        }
        for i, p in enumerate(train)
    ]
    return {"preference_train": train, "preference_validation": validation, "kto_train": kto}


def generate_preference_datasets(out_dir: str, seed: int = 0) -> dict[str, Path]:
    """Write :func:`preference_tables` as JSONL files into ``out_dir``; name to path.

    Kept apart from :func:`generate_datasets` so that the pre-training corpus (and with it every
    tiny tokenizer and model) does not change.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in preference_tables(seed).items():
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8", newline="\n"
        )
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line entry: write the datasets into a directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in generate_datasets(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
