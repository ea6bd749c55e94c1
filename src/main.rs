fn main() {
    std::process::exit(provisioner::run());
}
