"""Hand-written paraphrase groups for the text stream: each group states one fact in different words.

Neighbouring groups share a subject on purpose (a train that is late / a train that is cancelled,
a leaking roof / a leaking pipe), so telling paraphrases from unrelated sentences takes more than
matching the topic's words.
"""

from __future__ import annotations

PARAPHRASES: tuple[tuple[str, ...], ...] = (
    (
        "The 8:15 train to Leeds is running about twenty minutes late.",
        "Expect a delay of roughly twenty minutes on the quarter past eight service to Leeds.",
        "Our Leeds train, due at 8:15, won't leave until around 8:35.",
    ),
    (
        "The morning train to Leeds has been cancelled.",
        "There will be no Leeds service this morning; it was called off.",
        "Rail operators scrapped today's early departure to Leeds.",
        "Nobody is travelling to Leeds on the morning train, because it isn't running.",
    ),
    (
        "Water is dripping through the ceiling of the upstairs bedroom.",
        "The roof leaks and the bedroom on the top floor is getting wet.",
        "Rain is coming in above the top-floor bedroom.",
    ),
    (
        "A pipe under the kitchen sink has burst and flooded the floor.",
        "The kitchen is under water because the plumbing below the sink broke.",
        "Water gushed out from beneath the sink after a pipe split.",
        "We have a flooded kitchen floor: the sink's supply pipe failed.",
    ),
    (
        "The conveyor belt motor overheated and shut itself down.",
        "Running too hot, the belt's drive motor switched off automatically.",
        "The thermal cut-out stopped the conveyor motor after it got too warm.",
    ),
    (
        "Pressure in the main boiler rose well above its safe limit.",
        "The boiler's pressure reading climbed past the allowed maximum.",
        "We recorded a dangerous overpressure in the primary boiler.",
    ),
    (
        "My cat refuses to eat anything except fresh tuna.",
        "The only food my cat will accept is fresh tuna.",
        "Unless it is fresh tuna, our cat turns its nose up at dinner.",
    ),
    (
        "The dog barked at the postman all morning.",
        "All morning long the dog kept barking at the mail carrier.",
        "Our dog would not stop yapping at the person delivering letters.",
    ),
    (
        "The museum is closed on Mondays.",
        "You cannot visit the museum on a Monday.",
        "Mondays are the one day the gallery doors stay shut.",
        "The museum opens every day of the week except Monday.",
    ),
    (
        "Tickets for the concert sold out within ten minutes.",
        "Every seat for the show was gone ten minutes after sales opened.",
        "The gig was fully booked almost instantly, in under ten minutes.",
    ),
    (
        "She finished the marathon in just under three hours.",
        "Her marathon time was a little less than three hours.",
        "It took her slightly below 3 hours to run the full 42 kilometres.",
    ),
    (
        "He broke his leg while skiing in the Alps.",
        "A skiing accident in the Alps left him with a fractured leg.",
        "While on the slopes in the Alps, he fractured his leg.",
    ),
    (
        "The bank raised interest rates by a quarter of a percentage point.",
        "Borrowing costs went up 0.25 points after the central bank's decision.",
        "The central bank increased its key rate by 25 basis points.",
    ),
    (
        "The company's profits fell sharply in the last quarter.",
        "Earnings dropped steeply over the past three months.",
        "The firm made much less money in the most recent quarter.",
        "Quarterly profit at the business declined a lot.",
    ),
    (
        "The invoice has to be paid by the end of the month.",
        "Payment of this bill is due before the month is over.",
        "Please settle the invoice no later than the last day of the month.",
    ),
    (
        "The parcel was left with a neighbour because nobody was home.",
        "With no one in, the courier gave the package to the people next door.",
        "Your delivery is at the neighbour's house since the house was empty.",
    ),
    (
        "The package was damaged in transit and arrived crushed.",
        "The box turned up flattened after being mishandled during shipping.",
        "Shipping ruined the parcel; it came in squashed.",
    ),
    (
        "It will rain heavily in the north tomorrow afternoon.",
        "Expect downpours across northern areas tomorrow after midday.",
        "The forecast says the north gets a lot of rain tomorrow afternoon.",
    ),
    (
        "Temperatures will drop below freezing tonight.",
        "Tonight it is going to get colder than zero degrees.",
        "There will be frost tonight as the thermometer falls under 0 °C.",
    ),
    (
        "The meeting has been moved from Tuesday to Thursday.",
        "We rescheduled Tuesday's meeting for Thursday.",
        "The get-together will now take place on Thursday instead of Tuesday.",
        "Thursday is the new date for the meeting that was planned for Tuesday.",
    ),
    (
        "I forgot my password and cannot log in.",
        "I can't get into my account because I don't remember the password.",
        "Signing in fails since my password slipped my mind.",
    ),
    (
        "The website is down and shows an error page.",
        "The site isn't loading; all you get is an error.",
        "Our web page is offline and only displays an error message.",
    ),
    (
        "The laptop battery only lasts about an hour now.",
        "After roughly sixty minutes on battery, the notebook dies.",
        "My laptop no longer holds a charge for more than an hour.",
    ),
    (
        "The printer on the second floor is out of paper.",
        "There is no paper left in the second-floor printer.",
        "Someone needs to refill the paper tray of the printer upstairs on level two.",
    ),
    (
        "Add the eggs one at a time and beat well after each.",
        "Mix thoroughly after adding each egg, putting them in individually.",
        "Crack in the eggs singly, whisking hard between them.",
    ),
    (
        "Bake the bread for forty minutes until the crust is golden.",
        "Leave the loaf in the oven for 40 minutes, until it browns on top.",
        "The bread needs about forty minutes of baking to get a golden crust.",
    ),
    (
        "The bridge will be closed to traffic for repairs next week.",
        "Next week, cars cannot cross the bridge while it is being fixed.",
        "Road works will shut the bridge to vehicles over the coming week.",
    ),
    (
        "A fallen tree is blocking the road near the school.",
        "The street by the school is obstructed by a tree that came down.",
        "Traffic can't pass the school because a tree fell across the road.",
    ),
    (
        "The patient's fever went down overnight.",
        "By morning the patient's temperature had dropped.",
        "Overnight, the sick man's high temperature eased.",
    ),
    (
        "Wash your hands before handling food.",
        "Clean your hands prior to touching anything you will eat.",
        "Before preparing meals, make sure your hands have been washed.",
    ),
    (
        "The library extended its opening hours until ten at night.",
        "You can now stay at the library until 10 pm.",
        "The library closes later than before, at ten in the evening.",
    ),
    (
        "The children planted tomatoes in the school garden.",
        "Pupils put tomato plants in the garden at their school.",
        "In the school's vegetable patch, the kids sowed tomatoes.",
    ),
    (
        "The camera lens is cracked and every photo looks blurry.",
        "Because the lens has a crack, all the pictures come out fuzzy.",
        "A broken camera lens is making the shots unsharp.",
    ),
    (
        "The front door was left unlocked all night.",
        "Nobody locked the main entrance overnight.",
        "All night long the front door stayed open to anyone, without the lock on.",
    ),
)
