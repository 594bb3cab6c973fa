"""Curating a dataset: every rule with records it must drop and records it must keep, exact counts in the
report, the dropped side file, pattern files, and near duplicates found among hand-written paraphrases while
distinct answers on the same topic are kept."""

import json
import tracemalloc
from pathlib import Path

import pytest
from helpers import read_jsonl

from camelid.data.curate import (
    REFUSAL_PATTERNS, RULES, count_words, curate, dropped_path, lsh_bands, read_patterns,
)
from camelid.data.formats import BadRecord
from camelid.errors import CamelidError

# Hand-written (prompt, answer) originals, paraphrased copies, and distinct texts on the same topic.
ORIGINALS = [
    ("Explain how photosynthesis works.",
     "Photosynthesis is the process plants use to turn light into chemical energy. It takes place mainly in the "
     "leaves, inside chloroplasts that contain the green pigment chlorophyll. In the light-dependent reactions, "
     "chlorophyll absorbs sunlight and uses its energy to split water molecules, releasing oxygen as a by-product. "
     "The energy captured this way is stored in ATP and NADPH. In the Calvin cycle the plant then uses that stored "
     "energy to fix carbon dioxide from the air into sugars such as glucose, which it burns for energy or builds "
     "into starch and cellulose."),
    ("What causes the seasons on Earth?",
     "The seasons are caused by the tilt of Earth's axis, which is about 23.5 degrees relative to its orbit around "
     "the Sun. As Earth travels around the Sun, the hemisphere tilted towards it receives sunlight more directly "
     "and for more hours each day, so it warms up and has summer. At the same time the other hemisphere is tilted "
     "away, gets weaker slanting light and shorter days, and has winter. The distance between Earth and the Sun "
     "changes a little during the year, but that is not what causes the seasons: Earth is actually closest to the "
     "Sun in early January, during the northern winter."),
    ("How do vaccines protect you from disease?",
     "A vaccine trains your immune system to recognise a pathogen before you ever meet the real thing. It contains "
     "a harmless piece or version of the germ, such as an inactivated virus, a protein from its surface, or mRNA "
     "instructions for making that protein. Your immune system reacts to it by producing antibodies and memory "
     "cells. If you are later exposed to the actual virus or bacterium, those memory cells recognise it quickly "
     "and mount a strong response, often stopping the infection before you get sick or making the illness much "
     "milder."),
    ("Write a short introduction to the Python programming language.",
     "Python is a high-level, general-purpose programming language created by Guido van Rossum and first released "
     "in 1991. Its design emphasises readability, using indentation instead of braces to mark blocks of code. "
     "Python is dynamically typed and garbage collected, and it supports several programming styles, including "
     "procedural, object-oriented and functional programming. It comes with a large standard library, and its "
     "package index offers hundreds of thousands of third-party packages. Today it is widely used for web "
     "development, automation, data analysis, scientific computing and machine learning."),
    ("What are the main causes of inflation?",
     "Inflation is a general rise in prices across an economy, and economists usually group its causes into a few "
     "kinds. Demand-pull inflation happens when spending grows faster than the economy can produce goods and "
     "services, for example after a large increase in the money supply. Cost-push inflation happens when the costs "
     "of production rise, such as when energy prices jump or wages increase faster than productivity. Expectations "
     "matter too: if businesses and workers expect prices to keep rising, they raise prices and ask for higher pay "
     "in advance, which keeps inflation going."),
    ("Give me tips for sleeping better.",
     "Try to go to bed and wake up at the same time every day, even on weekends, so your body clock stays steady. "
     "Keep your bedroom dark, quiet and cool, and use the bed only for sleep rather than for work or scrolling on "
     "your phone. Avoid caffeine in the afternoon and heavy meals or alcohol close to bedtime. Bright screens in the "
     "hour before sleep can delay it, so dim the lights and read a book instead. Regular exercise during the day "
     "helps as well, and if you cannot fall asleep after twenty minutes, get up and do something calm until you "
     "feel sleepy."),
    ("Why did the Roman Empire fall?",
     "Historians do not agree on a single cause for the fall of the Western Roman Empire in 476. Political "
     "instability played a large part: emperors were frequently murdered or overthrown, and civil wars drained "
     "the treasury and the army. The economy suffered from heavy taxation, debased coinage and disrupted trade. "
     "At the same time, pressure on the frontiers grew as Goths, Vandals, Huns and other peoples moved into "
     "Roman territory. The empire came to rely on hired barbarian soldiers, and eventually one of their "
     "commanders, Odoacer, deposed the last western emperor, Romulus Augustulus."),
    ("How does a refrigerator keep food cold?",
     "A refrigerator moves heat from the inside of the cabinet to the kitchen using a refrigerant that circulates "
     "in a closed loop. The compressor squeezes the refrigerant gas, which makes it hot, and pumps it through the "
     "coils at the back, where it gives off heat and condenses into a liquid. The liquid then passes through an "
     "expansion valve, where its pressure drops suddenly and it becomes very cold. Inside the fridge it flows "
     "through the evaporator coils, absorbs heat from the food and air, and boils back into a gas before "
     "returning to the compressor to start the cycle again."),
    ("What is the difference between weather and climate?",
     "Weather describes the conditions of the atmosphere over a short period, such as today's temperature, rain, "
     "wind and cloud cover in a particular place. It can change from hour to hour. Climate is the average pattern "
     "of weather in a region over a long time, usually thirty years or more. So a single cold week in summer is "
     "weather, while the fact that a city usually has mild, wet winters and dry summers describes its climate. A "
     "useful way to remember it is that climate is what you expect, and weather is what you get."),
    ("Explain what a black hole is.",
     "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape from "
     "it. Most black holes form when a very massive star runs out of fuel and its core collapses under its own "
     "weight. The boundary around a black hole beyond which escape is impossible is called the event horizon. "
     "Black holes cannot be seen directly, but astronomers detect them by watching how they pull on nearby stars "
     "and gas, and by the X-rays that gas gives off as it heats up while falling in. In 2019 the Event Horizon "
     "Telescope released the first image of the shadow of a black hole."),
]

PARAPHRASES = [
    ("Can you explain how photosynthesis works?",
     "Photosynthesis is the process plants use to convert light into chemical energy. It happens mostly in the "
     "leaves, inside chloroplasts that contain the green pigment chlorophyll. In the light-dependent reactions, "
     "chlorophyll absorbs sunlight and uses its energy to split water molecules, giving off oxygen as a by-product. "
     "The energy captured this way is stored in ATP and NADPH. In the Calvin cycle the plant then uses that stored "
     "energy to fix carbon dioxide from the air into sugars like glucose, which it burns for energy or builds "
     "into starch and cellulose."),
    ("What causes the seasons on Earth?",
     "The seasons are caused by the tilt of Earth's axis, which is roughly 23.5 degrees relative to its orbit around "
     "the Sun. As Earth moves around the Sun, the hemisphere tilted towards it gets sunlight more directly "
     "and for more hours each day, so it warms up and has summer. At the same time the other hemisphere is tilted "
     "away, gets weaker slanting light and shorter days, and has winter. Earth is in fact closest to the Sun in "
     "early January, during the northern winter. The distance between Earth and the Sun changes a little during "
     "the year, but that is not what causes the seasons."),
    ("How do vaccines protect people from disease?",
     "A vaccine trains your immune system to recognise a pathogen before you ever meet the real thing. It contains "
     "a harmless piece or version of the germ, such as an inactivated virus, a protein from its surface, or mRNA "
     "instructions for making that protein. Your body reacts to it by making antibodies and memory "
     "cells. If you are later exposed to the real virus or bacterium, those memory cells recognise it quickly "
     "and mount a strong response, often stopping the infection before you fall ill or making the illness far "
     "milder."),
    ("Write a short introduction to the Python programming language.",
     "Python is a high-level, general-purpose programming language created by Guido van Rossum and first released "
     "in 1991. Its design emphasises readability, using indentation rather than braces to mark blocks of code. "
     "It comes with a large standard library, and its package index offers hundreds of thousands of third-party "
     "packages. Python is dynamically typed and garbage collected, and it supports several programming styles, "
     "including procedural, object-oriented and functional programming. Today it is widely used for web "
     "development, automation, data analysis, scientific computing and machine learning."),
    ("What are the main causes of inflation?",
     "Inflation is a general rise in prices across an economy, and economists usually group its causes into a few "
     "types. Demand-pull inflation occurs when spending grows faster than the economy can produce goods and "
     "services, for instance after a large increase in the money supply. Cost-push inflation occurs when the costs "
     "of production rise, such as when energy prices jump or wages increase faster than productivity. Expectations "
     "matter too: if businesses and workers expect prices to keep rising, they raise prices and ask for higher pay "
     "in advance, which keeps inflation going."),
    ("Give me some tips for sleeping better.",
     "Try to go to bed and wake up at the same time every day, even at weekends, so your body clock stays steady. "
     "Keep your bedroom dark, quiet and cool, and use the bed only for sleep rather than for work or scrolling on "
     "your phone. Avoid caffeine in the afternoon and heavy meals or alcohol close to bedtime. Regular exercise "
     "during the day helps as well. Bright screens in the hour before sleep can delay it, so dim the lights and "
     "read a book instead, and if you cannot fall asleep after twenty minutes, get up and do something calm until "
     "you feel sleepy."),
    ("Why did the Roman Empire fall?",
     "Historians do not agree on one single cause for the fall of the Western Roman Empire in 476. Political "
     "instability played a big part: emperors were often murdered or overthrown, and civil wars drained "
     "the treasury and the army. The economy suffered from heavy taxation, debased coinage and disrupted trade. "
     "At the same time, pressure on the borders grew as Goths, Vandals, Huns and other peoples moved into "
     "Roman territory. The empire came to rely on hired barbarian soldiers, and eventually one of their "
     "commanders, Odoacer, deposed the last western emperor, Romulus Augustulus."),
    ("How does a fridge keep food cold?",
     "A refrigerator moves heat from the inside of the cabinet to the kitchen using a refrigerant that circulates "
     "in a closed loop. The compressor squeezes the refrigerant gas, which makes it hot, and pumps it through the "
     "coils at the back, where it releases heat and condenses into a liquid. The liquid then passes through an "
     "expansion valve, where its pressure drops sharply and it becomes very cold. Inside the fridge it flows "
     "through the evaporator coils, absorbs heat from the food and air, and boils back into a gas before "
     "going back to the compressor to start the cycle again."),
    ("What is the difference between weather and climate?",
     "Weather describes the state of the atmosphere over a short period, such as today's temperature, rain, "
     "wind and cloud cover in a particular place. It can change from hour to hour. Climate is the average pattern "
     "of weather in a region over a long time, usually thirty years or more. A useful way to remember it is that "
     "climate is what you expect, and weather is what you get. So a single cold week in summer is weather, while "
     "the fact that a city usually has mild, wet winters and dry summers describes its climate."),
    ("Explain what a black hole is.",
     "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape from "
     "it. Most black holes are formed when a very massive star runs out of fuel and its core collapses under its own "
     "weight. The boundary around a black hole beyond which escape is impossible is known as the event horizon. "
     "Black holes cannot be observed directly, but astronomers detect them by watching how they pull on nearby stars "
     "and gas, and by the X-rays that gas emits as it heats up while falling in. In 2019 the Event Horizon "
     "Telescope released the first image of the shadow of a black hole."),
]

SAME_TOPIC = [
    ("Why are most plants green?",
     "Plants look green because of chlorophyll, the pigment they use to capture light for photosynthesis. "
     "Chlorophyll absorbs red and blue light strongly but reflects much of the green light that falls on it, so "
     "green is the colour that reaches our eyes. Other pigments, such as carotenoids, are also present in leaves "
     "but are usually masked by the large amount of chlorophyll. In autumn, when trees stop making chlorophyll and "
     "it breaks down, those yellow and orange pigments become visible."),
    ("Why is it hot in summer and cold in winter?",
     "In summer the Sun climbs higher in the sky at midday, so its rays hit the ground at a steeper angle and "
     "deliver more energy to each square metre. Days are also longer, which gives the land and oceans more time to "
     "soak up heat than they lose at night. In winter the low Sun spreads its light over a larger area and the "
     "nights are long, so the ground cools. The hottest weeks usually come a month or so after the longest day, "
     "because the oceans take time to warm up."),
    ("Are vaccines safe?",
     "Vaccines are among the most closely studied medical products. Before approval they go through several "
     "phases of clinical trials involving thousands of volunteers, and regulators keep monitoring them after they "
     "are in use. Most side effects are mild and short-lived, such as a sore arm, tiredness or a slight fever for "
     "a day or two. Serious reactions like severe allergies are rare, and vaccination sites are prepared to treat "
     "them. For nearly everyone, the risks of the diseases vaccines prevent are far greater than the risks of the "
     "vaccines."),
    ("Should I learn Python or JavaScript first?",
     "It depends on what you want to build. If you are interested in websites and anything that runs in a browser, "
     "JavaScript is hard to avoid, since it is the language browsers understand. If you care more about data "
     "analysis, scripting, or machine learning, Python is usually the better first choice, and its clean syntax "
     "makes it friendly for beginners. Both have huge communities and plenty of free tutorials. Whichever you pick, "
     "the core ideas of variables, loops, functions and data structures carry over to the other."),
    ("How do central banks fight inflation?",
     "The main tool is the interest rate. When a central bank raises its policy rate, borrowing becomes more "
     "expensive for banks, businesses and households, so people take out fewer loans, spend less and save more. "
     "Lower demand eases the pressure on prices. Central banks can also shrink their balance sheets by selling "
     "bonds they bought earlier, which pulls money out of the financial system. Just as important is "
     "communication: by promising to keep inflation near its target, a credible central bank shapes what people "
     "expect prices to do."),
    ("How many hours of sleep does an adult need?",
     "Most adults need between seven and nine hours of sleep a night, although a few people do well on slightly "
     "less or need a bit more. Regularly sleeping less than seven hours is linked with poorer concentration, "
     "weaker immunity, weight gain and a higher risk of heart disease. Teenagers need more, usually eight to ten "
     "hours, and older adults tend to sleep more lightly but still need about the same total. Feeling alert during "
     "the day without relying on caffeine is a good sign that you are getting enough."),
    ("What was daily life like in ancient Rome?",
     "For most Romans, daily life began at sunrise. Wealthy families lived in houses built around an open "
     "courtyard, while the poor crowded into tall apartment blocks called insulae, where fires and collapses were "
     "common. People ate bread, porridge, olives and vegetables, and the rich held long dinners with many courses. "
     "In the afternoon many Romans went to the public baths to wash, exercise and meet friends. Entertainment "
     "included chariot races at the Circus Maximus and gladiator fights in the amphitheatre."),
    ("Why is my fridge making a buzzing noise?",
     "A low hum is normal: it is the compressor and the fans running. A louder buzz often comes from the condenser "
     "fan at the back or bottom of the fridge, which can be blocked by dust or a stray piece of packaging. Ice "
     "building up around the evaporator fan in the freezer can make a similar sound. If the fridge has an ice maker "
     "connected to a water line that is turned off, the valve may buzz as it tries to fill. Cleaning the coils and "
     "checking the fans fixes most cases; a compressor that buzzes and keeps clicking off may need a technician."),
    ("How do scientists predict the weather?",
     "Weather forecasts start with observations collected from weather stations, balloons, ships, aircraft and "
     "satellites all over the world. These measurements of temperature, pressure, humidity and wind are fed into "
     "numerical models, which divide the atmosphere into a three-dimensional grid and use the equations of physics "
     "to calculate how it will change. Supercomputers run these models several times with slightly different "
     "starting conditions to see how certain the forecast is. Forecasters then interpret the results and add local "
     "knowledge before publishing them."),
    ("What would happen if you fell into a black hole?",
     "If you fell feet first into a black hole of a few solar masses, the pull on your feet would be much stronger "
     "than on your head, stretching you out long and thin in a process physicists call spaghettification. This "
     "would happen well before you reached the event horizon. Near a supermassive black hole, the tidal forces at "
     "the horizon are gentle, so you could cross it without noticing anything special. To a distant observer, "
     "though, you would appear to slow down and fade, never quite seeming to cross the edge."),
]


def chat(*turns: str, system: str | None = None, **extra) -> dict:
    """An OpenAI-format record: user and assistant turns alternating."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages, **extra}


def write_records(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# Records that every rule must keep: each looks like one that a careless rule would drop.
KEEP = [
    chat("As an AI language model, what would you say about cats?",
         "Cats are independent, curious animals that many people love."),  # the user may say it
    chat("I feel sad today.", "I'm sorry to hear that. Would you like to talk about what happened?"),
    chat("What does HTTP error 429 mean?",
         "Error code 429 means Too Many Requests: the server is rate limiting you, so wait and retry."),
    chat("Print hello in Python.", "Here is the code:\n```python\nprint('hello')\n```\nRun it with python."),
    chat("Where would you go in France?", "Paris, of course."),  # exactly three words
    chat("Reply OK if you understand.", "OK.", "Now summarise photosynthesis.",
         "Plants turn light, water and carbon dioxide into sugar and oxygen."),  # an early short answer
    chat("Write a loop.", "```python\nfor i in range(3):", "continue",
         "    print(i)\n```\nThat prints 0, 1 and 2."),  # cut, then finished after "continue"
    chat("Say something kind.", "You are doing better than you think.", system="Be warm.", id="k8"),
    chat("Write a haiku in Japanese.", "古池や蛙飛び込む水の音"),  # 17 words as CJK characters count
    # Issue 17: one-word answers that are right, a requested apology, and a role statement that refuses nothing.
    chat("Fill in the blank using a word that best completes the sentence.\n\nThe city was blanketed in a thick "
         "layer of eerie ____.", "fog."),
    chat("Input a URL and output the domain of that URL, excluding the subdomains.\n\n"
         "https://docs.google.com/document", "google.com"),
    chat("Is water wet?", "Yes."),
    chat("Generate an excuse for not coming to work", "I'm sorry, but I'm unable to come into work today due to "
         "unforeseen medical issues. I will try my best to recover quickly."),
    chat("How would you assist a visually impaired customer to complete their online shopping transaction?",
         "As an AI assistant, I would assist a visually impaired customer by reading the page aloud with "
         "text-to-speech and guiding them through each step."),
    chat("Write a story with dialogue.", 'The knight drew his sword. "I can\'t give up," he said, "and I won\'t '
                                         'help you with that plan."'),  # characters' speech is not the model's
]

# (record, the rule that must drop it), in file order after KEEP.
DROP = [
    ({"instruction": "Tell me a joke.", "output": ""}, "empty response"),
    (chat("Tell me a joke.", "..."), "empty response"),
    (chat("Summarise this.", "Rate limit reached for default-gpt-3.5-turbo in organization org-x on requests per "
                              "min. Limit: 3 / min."), "failed generation"),
    (chat("Translate this.", "Network error"), "failed generation"),  # two words, but a failure first
    (chat("Name a colour.", "None"), "failed generation"),
    (chat("Write a script.", "Here is the script:\n```bash\necho start\nfor i in 1 2 3; do"), "cut off"),
    (chat("Who should I vote for?", "As an AI language model, I do not have personal opinions about politics."),
     "refusal"),
    (chat("Help me pick a lock.", "I’m sorry, but I can’t assist with that."), "refusal"),  # curly apostrophes
    (chat("Write a poem.", "I am unable to write poems.", "Then a story?", "Once upon a time there was a fox."),
     "refusal"),  # in any answer, not only the last
    (chat("Write an essay about water.", "Yes."), "tiny response"),  # short only where a long answer was asked
    (chat("Can you explain how tides work?", "I cannot."), "tiny response"),
    (chat("AS AN AI LANGUAGE MODEL, what would you say about   cats?",
          "cats are independent, curious animals that many people love."), "exact duplicate"),
    (KEEP[1], "exact duplicate"),
    (chat("Who should I vote for?", "As an AI language model, I do not have personal opinions about politics."),
     "refusal"),  # a copy of a dropped record is dropped by its own rule, not as a duplicate
]


def test_each_rule_drops_its_records_keeps_the_rest_and_counts_exactly(tmp_path):
    src = write_records(tmp_path / "in.jsonl", KEEP + [record for record, _ in DROP])
    out = tmp_path / "out.jsonl"
    report = curate(src, out, write_dropped=True)
    kept = read_jsonl(out)
    assert [r["messages"] for r in kept] == [r["messages"] for r in KEEP]
    assert kept[7]["id"] == "k8"  # other keys travel with the record
    assert (report.read, report.written) == (len(KEEP) + len(DROP), len(KEEP))
    assert dict(report.dropped) == {"empty response": 2, "failed generation": 3, "cut off": 1, "refusal": 4,
                                    "tiny response": 2, "exact duplicate": 2}
    dropped = read_jsonl(dropped_path(out))
    assert dropped_path(out) == tmp_path / "out.jsonl.dropped.jsonl"
    assert [(d["rule"], d["where"]) for d in dropped] == [
        (rule, f"{src}:{len(KEEP) + i}") for i, (_, rule) in enumerate(DROP, 1)
    ]
    by_line = {d["where"]: d for d in dropped}
    first = len(KEEP) + 1
    assert by_line[f"{src}:{first + 2}"]["pattern"] == r"\brate limit (?:reached|exceeded)\b"
    assert by_line[f"{src}:{first + 6}"]["match"] == "As an AI language model, I do not"
    assert by_line[f"{src}:{first + 7}"]["match"] == "I can’t assist"
    assert (by_line[f"{src}:{first + 9}"]["words"], by_line[f"{src}:{first + 9}"]["asked"]) == (1, "Write an essay")
    assert by_line[f"{src}:{first + 11}"]["duplicate_of"] == f"{src}:1"
    assert by_line[f"{src}:{first + 12}"]["duplicate_of"] == f"{src}:2"
    saved = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert saved["dropped_total"] == len(DROP) and saved["outputs"]["dropped"] == str(dropped_path(out))
    assert saved["rules"] == ", ".join(RULES)


def test_rules_can_be_turned_off(tmp_path):
    records = [chat("Is water wet?", "Yes."), chat("Write a script.", "```bash\necho start"),
               chat("Who?", "As an AI language model, I cannot say."), chat("Name one.", "None")]
    src = write_records(tmp_path / "in.jsonl", records)
    report = curate(src, tmp_path / "out.jsonl", min_response_words=0, drop_cut_off=False, refusal_patterns=[],
                    failure_patterns=[])
    assert report.written == 4 and not report.dropped
    assert report.facts["rules"] == "empty response, exact duplicate, near duplicate"
    assert not dropped_path(tmp_path / "out.jsonl").exists()  # only written when asked


def test_min_response_words_counts_the_last_answer(tmp_path):
    records = [chat("Describe a cat.", "One two three four five."), chat("Describe a dog.", "One two three four")]
    src = write_records(tmp_path / "in.jsonl", records)
    assert curate(src, tmp_path / "out.jsonl", min_response_words=5).dropped == {"tiny response": 1}
    assert count_words("don't stop-me now") == 5
    assert count_words("我喜欢学习中文") == 7 and count_words("私はneko好き") == 5


def test_bad_records_are_errors_naming_the_line_or_counted_with_skip_bad(tmp_path):
    src = write_records(tmp_path / "in.jsonl", [chat("Q?", "A fine answer here."), "{oops",
                                                {"conversations": [{"from": "gpt", "value": "orphan answer"}]}])
    with pytest.raises(BadRecord, match=f"{src}:2: invalid JSON"):
        curate(src, tmp_path / "out.jsonl")
    report = curate(src, tmp_path / "out.jsonl", skip_bad=True, write_dropped=True)
    assert report.written == 1 and dict(report.dropped) == {"invalid JSON": 1, "no user turn": 1}
    assert [d["rule"] for d in read_jsonl(dropped_path(tmp_path / "out.jsonl"))] == ["invalid JSON", "no user turn"]


def test_null_or_missing_answers_are_empty_responses_not_bad_records(tmp_path):
    records = [
        {"instruction": "Tell me a joke.", "input": "", "output": None},  # the commonest failed generation
        {"instruction": "Tell me a riddle."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
        {"prompt": "Name a river.", "response": None, "source": "laion/unified_chip2"},
        {"prompt": "Name a lake.", "response": "Lake Baikal, in Siberia.", "source": "laion/unified_chip2"},
    ]
    src = write_records(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    report = curate(src, out, write_dropped=True)  # without skip_bad: none of these is an error
    assert (report.written, dict(report.dropped)) == (1, {"empty response": 5})
    assert [(d["rule"], d["record"]) for d in read_jsonl(dropped_path(out))] == [
        ("empty response", r) for r in records[:5]
    ]
    # A GPT4All row keeps its `source` beside the messages, and leaves its prompt and response behind.
    assert read_jsonl(out) == [{"messages": [{"role": "user", "content": "Name a lake."},
                                           {"role": "assistant", "content": "Lake Baikal, in Siberia."}],
                              "source": "laion/unified_chip2"}]
    # An answer that is there but is not text is still a bad record.
    src = write_records(tmp_path / "bad.jsonl", [{"instruction": "Count.", "output": 5}])
    with pytest.raises(BadRecord, match=f"{src}:1: message content is not a string"):
        curate(src, out)


def test_dropped_records_are_held_only_to_be_written(tmp_path):
    # 200 refusals of 11 KB each, 2 MB in all: held for the side file, which they must not be without it.
    answer = "As an AI language model, I cannot help. " + "Lorem ipsum dolor sit amet. " * 400
    src = write_records(tmp_path / "in.jsonl", [chat(f"Question {i}?", f"{i} {answer}") for i in range(200)])
    size = src.stat().st_size

    def peak_memory(**kwargs) -> int:
        tracemalloc.start()
        try:  # no failure patterns: scanning every answer for them only makes the test slow
            report = curate(src, tmp_path / "out.jsonl", near_duplicate_threshold=None, failure_patterns=[], **kwargs)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert report.dropped == {"refusal": 200}
        return peak

    assert peak_memory(write_dropped=True) > size  # the measure sees the records when they are held
    assert peak_memory() < size / 4


def test_pattern_files_extend_or_replace_the_defaults(tmp_path):
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("# our model's own disclaimers\n\n\\bas a large language model\\b\nbeep boop\n")
    assert read_patterns(patterns) == [r"\bas a large language model\b", "beep boop"]
    records = [chat("Who are you?", "As a large language model, I have no name."),
               chat("Sing.", "BEEP BOOP, here is my song about the sea."),
               chat("Vote?", "As an AI language model, I do not vote.")]
    src = write_records(tmp_path / "in.jsonl", records)
    extended = curate(src, tmp_path / "a.jsonl", refusal_patterns=REFUSAL_PATTERNS + tuple(read_patterns(patterns)))
    assert extended.dropped == {"refusal": 3}
    replaced = curate(src, tmp_path / "b.jsonl", refusal_patterns=read_patterns(patterns))
    assert replaced.dropped == {"refusal": 2}
    assert read_jsonl(tmp_path / "b.jsonl")[0]["messages"][1]["content"].startswith("As an AI language model")
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\n\n(unclosed\n")
    with pytest.raises(CamelidError, match=f"{bad}:3: not a regular expression"):
        read_patterns(bad)
    with pytest.raises(CamelidError, match="refusal pattern '\\[' is not a regular expression"):
        curate(src, tmp_path / "c.jsonl", refusal_patterns=["["])


# -- near duplicates ---------------------------------------------------------------------------------------


def records_of(pairs) -> list[dict]:
    return [chat(q, a) for q, a in pairs]


def test_paraphrased_copies_are_near_duplicates_of_the_first_and_same_topic_answers_are_kept(tmp_path):
    src = write_records(tmp_path / "in.jsonl", records_of(ORIGINALS + SAME_TOPIC + PARAPHRASES))
    out = tmp_path / "out.jsonl"
    report = curate(src, out, write_dropped=True)
    assert dict(report.dropped) == {"near duplicate": 10}
    assert [r["messages"] for r in read_jsonl(out)] == [r["messages"] for r in records_of(ORIGINALS + SAME_TOPIC)]
    dropped = read_jsonl(dropped_path(out))
    pairs = [(d["where"], d["duplicate_of"]) for d in dropped]
    assert pairs == [(f"{src}:{21 + i}", f"{src}:{1 + i}") for i in range(10)]
    assert all(0.8 <= d["similarity"] < 1 for d in dropped)
    # The copies are found by their word overlap, not by luck in the index: each alone against its original.
    for original, copy in zip(ORIGINALS, PARAPHRASES):
        one = write_records(tmp_path / "one.jsonl", records_of([copy, original]))  # the copy first: it is kept
        assert curate(one, tmp_path / "one.out.jsonl").dropped == {"near duplicate": 1}
    report = curate(src, out, near_duplicate_threshold=None)
    assert report.written == 30 and "near duplicate" not in report.facts["rules"]


def test_distinct_answers_on_one_topic_stay_far_below_the_threshold(tmp_path):
    # At a threshold of 0.3, well under the default 0.8, still no pair of the 20 distinct texts is a duplicate.
    src = write_records(tmp_path / "in.jsonl", records_of(ORIGINALS + SAME_TOPIC))
    assert curate(src, tmp_path / "out.jsonl", near_duplicate_threshold=0.3).dropped == {}
    # A shared system prompt does not make records alike.
    long_system = "You are a helpful assistant. " * 30
    records = [chat(q, a, system=long_system) for q, a in ORIGINALS]
    src = write_records(tmp_path / "sys.jsonl", records)
    assert curate(src, tmp_path / "sys.out.jsonl").dropped == {}


def test_lsh_bands_propose_a_pair_at_the_threshold_almost_always():
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.99
        # and no more bands than needed: one more row per band would miss too many
        more = rows + 1
        assert 1 - (1 - threshold**more) ** (128 // more) < 0.99
    assert lsh_bands(0.8, 128) == (21, 6)


def test_bad_thresholds_and_word_minimums_are_refused(tmp_path):
    src = write_records(tmp_path / "in.jsonl", [chat("Q?", "A fine answer here.")])
    with pytest.raises(CamelidError, match="near-duplicate threshold must be above 0 and at most 1"):
        curate(src, tmp_path / "out.jsonl", near_duplicate_threshold=1.5)
    with pytest.raises(CamelidError, match="min_response_words must be a whole number"):
        curate(src, tmp_path / "out.jsonl", min_response_words=-1)
    with pytest.raises(CamelidError, match="no such directory; create it"):
        curate(src, tmp_path / "nope" / "out.jsonl")


def test_pattern_files_add_to_the_built_in_patterns_or_replace_them(tmp_path):
    from camelid.data.curate import parse_threshold, patterns_with

    extra = tmp_path / "extra.txt"
    extra.write_text("# mine\nI cannot\n\nno way\n")
    assert patterns_with(("a", "b"), None) == patterns_with(("a", "b"), None, replace=True) == ("a", "b")
    assert patterns_with(("a", "b"), extra) == ("a", "b", "I cannot", "no way")
    assert patterns_with(("a", "b"), extra, replace=True) == ("I cannot", "no way")
    assert [parse_threshold(t) for t in ("0.75", "1", "none", "off", "0")] == [0.75, 1.0, None, None, None]
    with pytest.raises(CamelidError, match=r"^--near-dup-threshold: 'high' is not a number; give e\.g\. 0\.8, or none$"):
        parse_threshold("high")


# -- issue 17: rules relative to the question, refusals that are refusals, duplicates in the text that differs ---


def only_rule(tmp_path, records, **rules):
    """The (rule, text of the last answer) of each dropped record, with the other rules turned off."""
    options = dict(failure_patterns=[], refusal_patterns=[], min_response_words=0, near_duplicate_threshold=None,
                   drop_cut_off=False) | rules
    src = write_records(tmp_path / "in.jsonl", records)
    curate(src, tmp_path / "out.jsonl", write_dropped=True, **options)
    return [(d["rule"], d["messages"][-1]["content"]) for d in read_jsonl(dropped_path(tmp_path / "out.jsonl"))]


def test_a_short_answer_is_tiny_only_where_a_long_one_was_asked(tmp_path):
    tiny = [("Write an essay about the sea.", "Waves."), ("Please write a poem about autumn.", "OK."),
            ("Can you explain how a compiler works?", "Parsing."), ("Tell me about Rome.", "Rome."),
            ("Compose a short story for my niece.", "Sure!"),
            ("Describe the water cycle.", "Evaporation, rain.")]
    fine = [("Select a random noun from the following list\n\nlist: dog, cat, bird, car", "bird"),
            ("Detect the sentiment of the sentence.\n\nNobody understands me.", "Negative"),
            ("What is 355*455?", "161,525"), ("Say hi.", "Hi."),
            ("Summarize this movie in just one word:\n\nA slow horror film about grief.", "Inert."),
            ("Describe the sky in one word.", "Blue."),
            ("This is part 2 of my messages. Reply \"acknowledged\" if you understand.\n\n"
             "How do value chains work? Explain the primary activities of a firm...", "Acknowledged.")]
    dropped = only_rule(tmp_path, [chat(q, a) for q, a in tiny + fine], min_response_words=3)
    assert dropped == [("tiny response", a) for _, a in tiny]


def test_refusals_are_dropped_and_answers_that_only_sound_like_one_are_kept(tmp_path):
    refusals = [
        "I'm sorry, but I am not able to generate a PDF or perform any other external task.",
        "As an AI, I don't have a physical house, so I cannot provide a description of it.",
        "I apologize, but it is not possible for me to provide the missing code for a Minesweeper solver.",
        "I'm just a computer program, so I don't have feelings or emotions like a human.",
        "I'm sorry, but I am a text-based AI and do not have the ability to display images.",
        "I’m sorry, I can’t help you with that.",  # curly apostrophes
        "Unfortunately, I am unable to browse the internet. However, here is what I know about the topic.",
        "That request goes against OpenAI's content policy.",
    ]
    answers = [
        "I'm sorry to hear that. Would you like to talk about it?",
        "I apologize for the confusion. Here is the corrected code.",
        "This error means Python cannot find the file you are trying to run.",
        "As an AI assistant, diplomacy forms a crucial part of my interaction with users.",
        "As an AI language model, I can suggest three ways to improve your essay.",
        "The kids loved it, and I can't recommend this summer camp highly enough!",
        "I can't help feeling that the ending of the novel was rushed.",
        "Dear Ms. Lee, I'm sorry, but I won't be able to attend the meeting on Friday.",  # a letter that was asked for
    ]
    dropped = only_rule(tmp_path, [chat("Go on.", t) for t in refusals + answers], refusal_patterns=REFUSAL_PATTERNS)
    assert dropped == [("refusal", t) for t in refusals]


TOOLS = ("toolformer: enabled\ntoolformer access: wikipedia, weather, python\n"
         "wikipedia: a wrapper around Wikipedia. Useful for when you need to display general information about "
         "people, places, companies, historical events, or other subjects found in an encyclopedia; it displays a "
         "snippet summary of the topic. Input should be a search query.\nweather: useful for when you want to get "
         "weather information from the OpenMeteo API. The input should be a question in natural language that this "
         "API can answer.\npython: executes Python code and returns the value of the last expression.\n")


def test_a_shared_opening_does_not_make_different_requests_alike(tmp_path):
    distinct = [("Provide a summary of the given historical event.\nFrench Revolution",
                 "Summary of the French Revolution: wikipedia('French Revolution')"),
                ("Provide a summary of the given historical event.\nBattle of Waterloo",
                 "Summary of the Battle of Waterloo: wikipedia('Battle of Waterloo')"),
                ("What is the weather like in Paris today?", "The weather in Paris today is weather('Paris today')."),
                ("Find the square root of 144.", "The square root of 144 is python('144 ** 0.5')."),
                ("Multiply 17 by 23.", "17 times 23 is python('17 * 23').")]
    copies = [("Give a short summary of the French Revolution from Wikipedia.",
               "Here is a summary of the French Revolution: wikipedia('French Revolution')."),
              ("Give a summary of the French Revolution.",
               "Here is a summary of the French Revolution: wikipedia('French Revolution')"),
              ("What's the weather like in Paris today?", "The weather in Paris today is: weather('Paris today')")]
    records = [chat(TOOLS + q, a) for q, a in distinct + copies]
    assert only_rule(tmp_path, records[:5], near_duplicate_threshold=0.8) == []  # the tool text alone made them 0.8
    dropped = only_rule(tmp_path, records, near_duplicate_threshold=0.8)
    assert dropped == [("near duplicate", a) for _, a in copies[1:]]
    # The same question with a different answer is a different example, not a copy.
    other = chat(TOOLS + distinct[2][0], "It is sunny and 24 degrees in Paris, according to weather('Paris').")
    assert only_rule(tmp_path, [records[2], other], near_duplicate_threshold=0.8) == []
