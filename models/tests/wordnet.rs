//! The WordNet 3.0 definition-modelling data as the TBT recipe reads it, on the real files: every synset
//! of the four data files, known entries, and a split that stays put.

// The model tests' helpers live in the same module.
#[allow(dead_code)]
mod common;

use trit_models::wordnet::{load, pairs, split_of, Split};

#[test]
fn reads_every_synset_of_wordnet_3_0() {
    let synsets = load(&common::wordnet_dir()).expect("WordNet parses");
    // WordNet 3.0's published counts: 82,115 noun, 13,767 verb, 18,156 adjective (head and satellite)
    // and 3,621 adverb synsets.
    let count = |p: &[char]| synsets.iter().filter(|s| p.contains(&s.pos)).count();
    assert_eq!(count(&['n']), 82_115);
    assert_eq!(count(&['v']), 13_767);
    assert_eq!(count(&['a', 's']), 18_156);
    assert_eq!(count(&['r']), 3_621);

    let entity = synsets
        .iter()
        .find(|s| s.id() == "n00001740")
        .expect("entity");
    assert_eq!(entity.words, ["entity"]);
    assert!(entity
        .definition
        .starts_with("that which is perceived or known"));
    let sweat = synsets
        .iter()
        .find(|s| s.id() == "v00067545")
        .expect("sweat");
    assert_eq!(
        sweat.input(),
        "v: sweat, sudate, perspire: Exercise makes one sweat"
    );
    assert_eq!(
        sweat.definition,
        "excrete perspiration through the pores in the skin"
    );
    assert!(synsets
        .iter()
        .all(|s| !s.definition.is_empty() && !s.words.is_empty()));
}

#[test]
fn the_split_is_90_5_5_and_disjoint() {
    let synsets = load(&common::wordnet_dir()).expect("WordNet parses");
    let (train, val, test) = (
        pairs(&synsets, Split::Train),
        pairs(&synsets, Split::Validation),
        pairs(&synsets, Split::Test),
    );
    assert_eq!(train.len() + val.len() + test.len(), synsets.len());
    let share = |n: usize| n as f64 / synsets.len() as f64;
    assert!((share(train.len()) - 0.90).abs() < 0.005, "{}", train.len());
    assert!((share(val.len()) - 0.05).abs() < 0.005, "{}", val.len());
    assert!((share(test.len()) - 0.05).abs() < 0.005, "{}", test.len());
    // The split of a synset depends on its id alone.
    assert_eq!(split_of("n00001740"), split_of(&synsets[0].id()));
}
