"""Word lists of the synthetic world: our own, written for this package (redistributable).

Rules the generator and the tests rely on:
- no first name ends with another (so a core line such as "Ana lives in Porto." can never occur
  inside "Diana lives in Porto."), and no person name is a word of any other list;
- `RESERVED_TOPICS` name things that no dialogue ever mentions: the abstention questions ask about
  them, and a test checks that none of their key words occurs in any generated turn.
"""

from __future__ import annotations

FIRST_NAMES = (
    "Maya", "Tomas", "Priya", "Lucas", "Nora", "Omar", "Elena", "Kenji", "Sofia", "Daniel", "Amara",
    "Felix", "Hana", "Marco", "Leila", "Jonas", "Clara", "Ravi", "Ingrid", "Mateo", "Zoe", "Samir",
    "Yuki", "Erik", "Alma", "Diego", "Freya", "Tariq", "Iris", "Hugo", "Mira", "Victor", "Lena",
    "Kofi", "Greta", "Pablo", "Aisha", "Oscar", "Chloe", "Idris", "Wanda", "Bruno", "Selin", "Arjun",
    "Paula", "Rosa", "Emil", "Naledi", "Tobias", "Ines", "Malik", "Astrid", "Rohan", "Vera", "Caleb",
    "Noor", "Sven", "Lucia", "Kwame", "Dalia",
)
RELATIVE_NAMES = {
    "sister": ("Ada", "Mia", "Eva", "Tess", "Lily", "Ruth", "June", "Nina", "Cora", "Lola", "Mae", "Pia"),
    "brother": ("Ben", "Leo", "Jude", "Otto", "Max", "Ezra", "Finn", "Hal", "Ivo", "Rex", "Gil", "Sam"),
}
RELATIVE_NAMES["cousin"] = RELATIVE_NAMES["sister"] + RELATIVE_NAMES["brother"]
PET_NAMES = (
    "Biscuit", "Pepper", "Mochi", "Juniper", "Waffles", "Nutmeg", "Pickle", "Clementine", "Bramble",
    "Toffee", "Pixel", "Marmalade", "Dumpling", "Sprout", "Pretzel", "Maple", "Noodle", "Ziggy",
)
PET_SPECIES = ("dog", "cat", "rabbit", "parrot", "tortoise", "hamster")
PET_TREATS = ("peanut butter", "sardines", "carrot tops", "sunflower seeds", "cheese cubes",
              "dried apple slices", "chicken strips", "blueberries")
CITIES = (
    "Lisbon", "Porto", "Denver", "Austin", "Toronto", "Melbourne", "Seattle", "Dublin", "Berlin",
    "Osaka", "Nairobi", "Bristol", "Montreal", "Valencia", "Edinburgh", "Portland", "Chicago",
    "Vienna", "Oslo", "Boston", "Auckland", "Cape Town", "Santiago", "Prague", "Glasgow", "Hamburg",
    "Kyoto", "Barcelona", "Helsinki", "Marseille",
)
HOMETOWNS = (
    "a small town in Vermont", "a fishing village in Norway", "a suburb of Manchester",
    "a farm outside Adelaide", "a mountain town in Colorado", "the outskirts of Lyon",
    "a coastal town in Kerala", "a village near Krakow", "a college town in Ohio", "an island off Scotland",
)
JOBS = (
    "nurse", "software engineer", "high school teacher", "architect", "pharmacist", "graphic designer",
    "physiotherapist", "accountant", "chef", "librarian", "electrician", "veterinarian", "journalist",
    "data analyst", "landscape gardener", "airline pilot", "carpenter", "translator", "paramedic",
    "museum curator",
)
FOODS = ("ramen", "lasagna", "pad thai", "fish tacos", "mushroom risotto", "dumplings", "paella",
         "butter chicken", "falafel wraps", "sushi", "pierogi", "chili con carne")
MUSIC = ("jazz", "bluegrass", "synth-pop", "reggae", "classical", "punk rock", "soul", "afrobeat",
         "country", "lo-fi hip hop")
HOBBIES = ("rock climbing", "birdwatching", "knitting", "trail running", "woodworking", "photography",
           "gardening", "sailing", "watercolour painting", "baking sourdough", "cycling", "pottery")
CAR_COLOURS = ("red", "blue", "silver", "white", "green", "black", "grey", "yellow")
CAR_MODELS = ("Mazda 3", "Toyota RAV4", "Honda Civic", "Volkswagen Golf", "Subaru Outback",
              "Ford Fiesta", "Kia Niro", "Volvo XC40", "Fiat 500", "Skoda Octavia")
CAFE_NAMES = ("Blue Door", "The Copper Kettle", "Little Fern", "Morning Glory", "The Daily Grind",
              "Half Moon", "Oak and Ember", "The Reading Room", "Sunny Side", "Common Ground")
CAFE_SPECIALTIES = ("cardamom buns", "flat whites", "lemon tarts", "cold brew", "cinnamon rolls", "matcha lattes",
                    "almond croissants", "chai")
STREETS = ("Elm Street", "Harbour Road", "Mill Lane", "Station Square", "Rose Avenue", "King Street",
           "Bridge Road", "Park Terrace", "Chapel Row", "Market Street")
RELATIONS = ("sister", "brother")  # a sibling fact; the merged occasion is always a cousin's

PARKS = ("Riverside Park", "Greenway Park", "Lakeshore Park", "Hillcrest Park", "Central Park")
TRAILS = ("Eagle Ridge", "Pine Hollow", "Fox Canyon", "Cedar Falls", "Granite Peak")
RESTAURANTS = ("Casa Lupa", "The Golden Fork", "Saffron House", "Blue Lotus", "Luigi's Trattoria",
               "The Olive Tree")
BANDS = ("The Lumineers", "Arcade Fire", "Khruangbin", "Bon Iver", "Fleet Foxes", "Phoenix")
LAKES = ("Silver Lake", "Moon Lake", "Lake Tarn", "Heron Lake")
ROOMS = ("living room", "kitchen", "spare bedroom", "hallway", "bathroom")
FILMS = ("a new sci-fi film", "an old Hitchcock film", "a documentary about whales", "an animated film",
         "a French comedy")
OCCASIONS = ("wedding", "housewarming party", "fortieth birthday party", "retirement party",
             "engagement party")

# Past events: (past tense phrase, base form), formatted with one slot value.
PAST_EVENTS = (
    ("ran a 10k race in {x}", "run a 10k race in {x}", PARKS),
    ("went hiking at {x}", "go hiking at {x}", TRAILS),
    ("had dinner at {x}", "have dinner at {x}", RESTAURANTS),
    ("saw {x} in concert", "see {x} in concert", BANDS),
    ("went kayaking on {x}", "go kayaking on {x}", LAKES),
    ("painted the {x}", "paint the {x}", ROOMS),
    ("watched {x} at the cinema", "watch {x} at the cinema", FILMS),
    ("volunteered at the food bank in {x}", "volunteer at the food bank in {x}", PARKS),
    ("took a pottery workshop at {x}", "take a pottery workshop at {x}", RESTAURANTS),
    ("went to a picnic at {x}", "go to a picnic at {x}", PARKS),
)
# Planned events: (base form, slot values).
PLANS = (
    ("fly to {x}", CITIES),
    ("go camping at {x}", LAKES),
    ("take a cooking class at {x}", RESTAURANTS),
    ("run a half marathon in {x}", PARKS),
    ("visit an old friend in {x}", CITIES),
    ("see {x} live", BANDS),
)

# Procedures: name, kind ("recipe" or "routine"), steps, and one revision (step index, new step,
# how the speaker says it).
PROCEDURES = (
    ("banana bread", "recipe",
     ("mash three ripe bananas", "stir in melted butter, sugar and one egg", "fold in flour and baking soda",
      "bake at 175 C for 60 minutes"),
     (2, "fold in flour, baking soda and chopped walnuts", "I've started folding chopped walnuts in with the flour")),
    ("shakshuka", "recipe",
     ("fry onions and red peppers", "add crushed tomatoes and cumin", "crack four eggs into the sauce",
      "cover and cook for 8 minutes"),
     (3, "cover and cook for 6 minutes", "I only cook it for 6 minutes now, the yolks stay runny")),
    ("pesto pasta", "recipe",
     ("toast pine nuts in a dry pan", "blend basil, garlic, parmesan and olive oil with the nuts",
      "boil the pasta for 9 minutes", "toss the pasta with the pesto and a splash of pasta water"),
     (2, "boil the pasta for 7 minutes", "I boil the pasta for just 7 minutes now")),
    ("overnight oats", "recipe",
     ("mix oats with milk and a spoon of yogurt", "add chia seeds and honey", "leave the jar in the fridge overnight",
      "top with berries in the morning"),
     (1, "add chia seeds and maple syrup", "I swapped the honey for maple syrup")),
    ("vegetable chili", "recipe",
     ("soften onions and garlic", "add peppers, beans and chopped tomatoes", "season with cumin and smoked paprika",
      "simmer for 40 minutes"),
     (3, "simmer for 25 minutes", "I only simmer it for 25 minutes these days")),
    ("morning routine", "routine",
     ("drink a glass of water", "stretch for ten minutes", "write in a journal", "make coffee"),
     (1, "do twenty minutes of yoga", "I swapped the stretching for twenty minutes of yoga")),
    ("workout routine", "routine",
     ("warm up with a 5 minute jog", "do three sets of squats", "do three sets of push-ups", "cool down with stretches"),
     (2, "do four sets of push-ups", "I'm doing four sets of push-ups now instead of three")),
    ("evening wind-down routine", "routine",
     ("switch off screens at 9 pm", "tidy the kitchen", "read a novel for half an hour", "turn off the lights at 10:30"),
     (2, "listen to a podcast for half an hour", "I listen to a podcast now instead of reading")),
    ("plant care routine", "routine",
     ("check the soil with a finger", "water the ferns every Monday", "mist the orchids", "rotate the pots toward the window"),
     (1, "water the ferns every Monday and Thursday", "the ferns get water on Thursdays too now")),
    ("weekly meal prep routine", "routine",
     ("plan five dinners on Sunday morning", "shop for groceries", "cook rice and roast vegetables",
      "pack lunches into glass boxes"),
     (0, "plan five dinners on Saturday evening", "I do the planning on Saturday evening now")),
)

# Abstention topics: (key words that never occur in any dialogue, question template).
RESERVED_TOPICS = (
    (("instrument",), "What instrument does {p} play?"),
    (("allergic", "allergy"), "What is {p} allergic to?"),
    (("boss",), "What is the name of {p}'s boss?"),
    (("language",), "Which language is {p} learning?"),
    (("grandmother", "grandma"), "What is the name of {p}'s grandmother?"),
    (("football",), "Which football team does {p} support?"),
    (("university",), "What did {p} study at university?"),
    (("shoe",), "What is {p}'s shoe size?"),
    (("novelist", "author"), "Who is {p}'s favourite author?"),
    (("tattoo",), "What tattoo does {p} have?"),
    (("motorbike", "motorcycle"), "What motorbike does {p} ride?"),
    (("vegetarian",), "When did {p} become vegetarian?"),
)

# Small talk that carries no memory: (opener, reply).
SMALL_TALK = (
    ("Did you get caught in that rain earlier?", "Totally soaked, but it was kind of refreshing."),
    ("Have you been watching anything good lately?", "Nothing new, I keep rewatching the same comedies."),
    ("It's been such a long week.", "Tell me about it, I'm ready for the weekend."),
    ("Is it just me or is it freezing today?", "It's not just you, I dug out my winter coat."),
    ("I need more coffee, honestly.", "Same, I'm on my second cup already."),
    ("Traffic was a nightmare this morning.", "Ugh, sounds awful. I stayed in, luckily."),
    ("The sunset was gorgeous last night.", "I saw it too! All pink and orange."),
    ("My phone keeps freezing.", "Have you tried turning it off and on again?"),
    ("I can't believe how fast this month went.", "Right? It feels like it just started."),
    ("Any fun plans for the evening?", "Just a quiet night, maybe some takeout."),
    ("I finally cleaned out my inbox.", "Impressive, mine is a disaster."),
    ("The neighbours are doing construction again.", "Oh no, that sounds noisy."),
    ("I slept so badly last night.", "Oh no, hope you catch up on sleep soon."),
    ("Everything feels a bit chaotic right now.", "Hang in there, it'll calm down."),
)
GREETINGS = (
    ("Hey {b}! How are you doing?", "Hi {a}! Pretty good, thanks. You?"),
    ("Hi {b}, got a minute to catch up?", "Always, {a}! What's new?"),
    ("{b}! It's been a while.", "I know, {a}! Let's catch up."),
    ("Morning {b}!", "Hey {a}, good to hear from you."),
)
FAREWELLS = (
    ("I should get going. Talk soon?", "Definitely, take care!"),
    ("Okay, I have to run. Good chatting!", "You too, bye for now!"),
    ("Let's talk again soon.", "For sure. Have a good one!"),
)
PROMPTS = ("So, what else is new with you?", "Anything else going on?", "How about you, any news?",
           "What else have you been up to?", "Tell me more about your week.")
REACTIONS = ("Oh nice!", "That sounds lovely.", "Ha, that's great.", "Good for you!", "Interesting!",
             "I love that.", "Nice, thanks for telling me.", "Oh, cool.")
CHANGE_REACTIONS = ("Wow, that's a big change!", "No way, congratulations!", "Oh, that's news!",
                    "Huh, I didn't see that coming.", "That's exciting!")
