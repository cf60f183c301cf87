import ArgumentParser
import Glibc
import Stasis

StasisCommand.main()
